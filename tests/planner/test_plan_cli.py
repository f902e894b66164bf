"""`msc plan` and `msc compile` with hardware: the table, JSON, the chosen spec, and clear errors."""
from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from msc.cli import app
from msc.planner.search import Workload
from tests.conftest import TINY

HW = {"pool": {"gpu": "H200", "count": 4, "per_node": 4}}
WL = {"input_len": 16, "output_len": 8, "tpot_ms": 50}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MSC_CACHE_DIR", str(tmp_path / "cache"))


def _spec(tmp_path, **extra) -> str:
    d = {"model": {"config": dict(TINY), "dtype": "float32"}, "device": "cpu", "hardware": HW, "workload": WL, **extra}
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(d))
    return str(p)


def test_plan_json_lists_plans_that_meet_the_target_and_writes_the_chosen_spec(tmp_path):
    chosen = tmp_path / "chosen.yaml"
    res = CliRunner().invoke(app, ["plan", _spec(tmp_path), "--json", "--top", "5", "-o", str(chosen)])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert 1 <= len(data["plans"]) <= 5
    assert all(p["tpot_ms"] <= WL["tpot_ms"] for p in data["plans"])
    assert all(p["gpus"] <= HW["pool"]["count"] for p in data["plans"])
    per_gpu = [p["per_gpu"] for p in data["plans"]]
    assert per_gpu == sorted(per_gpu, reverse=True)
    spec = yaml.safe_load(chosen.read_text())
    best = data["plans"][0]
    assert spec["plan"]["attention"] == best["attention"] and spec["plan"]["experts"] == best["experts"]
    assert spec["plan"]["microbatches"] == best["microbatches"]


def test_plan_table_is_printed(tmp_path):
    res = CliRunner().invoke(app, ["plan", _spec(tmp_path), "--top", "3"])
    assert res.exit_code == 0, res.output
    assert "gain vs colocated" in res.stdout and "colocated baseline" in res.stdout


def test_compile_fills_unset_plan_fields_from_the_planner(tmp_path):
    from msc.compiler import compile_spec
    from msc.spec import load_spec

    spec = load_spec(_spec(tmp_path, plan={"experts": {"nodes": 2}}))
    bundle = compile_spec(spec, tmp_path / "b")
    plan = bundle.manifest["plan"]
    assert plan["experts"]["nodes"] == 2  # given in the spec: kept
    assert plan["attention"]["tp"] == 1 and plan["experts"]["tp"] == 1  # the runtime runs tp = 1 only
    assert plan["microbatches"] >= 1 and plan["batch_size"] >= 1


@pytest.mark.parametrize("change, expected", [
    ({"hardware": {"pool": {"gpu": "V100", "count": 4}}}, "unknown GPU 'V100'"),
    ({"workload": {"input_len": 16, "output_len": 8, "tpot_ms": 1e-6}}, "no plan meets the constraints: .*takes .* ms a token even with one sequence"),
    ({"hardware": {"pool": {"gpu": "H200", "count": 4}, "overrides": {"H200": {"mem_gib": -1}}}}, "H200.*mem_gib"),
    ({"hardware": {"pool": {"gpu": "H200", "count": 0}}}, "count"),
    ({"hardware": None}, "no hardware for the planner"),
])
def test_bad_planner_input_is_one_clear_error(tmp_path, change, expected):
    chosen = tmp_path / "chosen.yaml"
    res = CliRunner().invoke(app, ["plan", _spec(tmp_path, **change), "-o", str(chosen)])
    assert res.exit_code != 0
    assert __import__("re").search(expected, res.output.replace("\n", " ")), res.output
    assert not chosen.exists()


def test_workload_contexts():
    wl = Workload(input_len=571, output_len=159)
    assert wl.max_context == 730 and wl.mean_context == 571 + 79.5


def test_timeline_of_the_best_plan_matches_the_model_step(tmp_path):
    from msc.planner.plan_spec import plan_spec, plan_timeline
    from msc.spec import load_spec

    report = plan_spec(load_spec(_spec(tmp_path, workload={"input_len": 571, "output_len": 159, "tpot_ms": 50})), top=3)
    png = tmp_path / "t.png"
    sim = plan_timeline(report, png)
    assert png.stat().st_size > 0
    # the discrete-event simulation of the chosen plan agrees with the closed form the search used
    assert sim["iteration_s"] == pytest.approx(sim["model_step_s"], rel=0.01)


@pytest.mark.parametrize("change, expected", [
    ({"model": {"config": {**TINY, "num_experts_per_tok": 5}, "dtype": "float32"}}, "top-k 5 is larger than the expert count"),
    ({"model": {"config": {**TINY, "max_position_embeddings": 64}, "dtype": "float32"},
      "workload": {"input_len": 60, "output_len": 8, "tpot_ms": 50}}, "68 tokens, longer than the model's max_position_embeddings \\(64\\)"),
    ({"workload": {"input_len": 16, "output_len": 8, "tpot_ms": float("inf")}}, "tpot_ms"),
    ({"plan": {"experts": {"nodes": 3}}}, "plan.experts.nodes is 3, which does not divide"),
])
def test_spec_errors_of_the_planner(tmp_path, change, expected):
    res = CliRunner().invoke(app, ["plan", _spec(tmp_path, **change)])
    assert res.exit_code != 0
    assert __import__("re").search(expected, res.output.replace("\n", " ")), res.output


def test_a_pinned_spec_evaluates_that_plan(tmp_path):
    free = json.loads(CliRunner().invoke(app, ["plan", _spec(tmp_path), "--json", "--top", "1"]).stdout)["plans"][0]
    plan = {"attention": free["attention"], "experts": free["experts"], "microbatches": free["microbatches"]}
    res = CliRunner().invoke(app, ["plan", _spec(tmp_path, plan=plan), "--json"])
    data = json.loads(res.stdout)
    assert len(data["plans"]) == 1
    p = data["plans"][0]
    for key in ("per_gpu", "tpot_ms", "batch", "t_a_ms", "t_e_ms", "t_c_ms", "gain", "binding"):  # today's keys, same values
        assert p[key] == free[key]
    assert p["tc_over_tf"] == pytest.approx(free["t_c_ms"] / max(free["t_a_ms"], free["t_e_ms"]))


def test_a_one_gpu_pool_prints_the_colocated_answer(tmp_path):
    res = CliRunner().invoke(app, ["plan", _spec(tmp_path, hardware={"pool": {"gpu": "H200", "count": 1}})])
    assert res.exit_code == 0, res.output
    out = res.stdout.replace("\n", " ")
    assert "no disaggregated plan fits" in out and "msc serve --colocated" in out
    data = json.loads(CliRunner().invoke(app, ["plan", _spec(tmp_path, hardware={"pool": {"gpu": "H200", "count": 1}}),
                                               "--json"]).stdout)
    assert data["plans"] == [] and data["colocated"]["gpus"] == 1 and data["chosen"] is None


def test_a_plan_slower_than_colocated_comes_with_a_warning(tmp_path):
    # tiny model on 2 GPUs: splitting it cannot beat one GPU holding it all
    res = CliRunner().invoke(app, ["plan", _spec(tmp_path, hardware={"pool": {"gpu": "H200", "count": 2}}), "--json"])
    data = json.loads(res.stdout)
    assert data["plans"][0]["gain"] < 1
    assert data["note"].startswith("warning: no disaggregated plan beats colocated")
    assert f"instances of {data['colocated']['gpus']} GPU" in data["note"]  # the colocated plan shown


def test_colocated_batch_adds_the_comparison_at_that_batch(tmp_path):
    res = CliRunner().invoke(app, ["plan", _spec(tmp_path), "--json", "--colocated-batch", "8"])
    data = json.loads(res.stdout)
    at = data["colocated_at_batch"]
    assert at["batch"] == 8
    for p in data["plans"]:  # each plan's gain against it, from the per-GPU figures
        assert p["gain_at_colocated_batch"] == pytest.approx(p["per_gpu"] / at["per_gpu"])
    table = CliRunner().invoke(app, ["plan", _spec(tmp_path), "--colocated-batch", "8"])
    assert "colocated at batch 8:" in table.stdout
