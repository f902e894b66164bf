"""msc profile: the fit, the errors without a GPU, and the H200 profile it wrote feeding the planner."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from msc.errors import MscError

ROOT = Path(__file__).resolve().parents[1]


def test_fit_matches_numpy_least_squares():
    from msc.profile import _fit

    rng = np.random.default_rng(0)
    xs = [16, 32, 64, 128, 256]
    ys = [3e-6 * x + 2e-4 + rng.normal(0, 1e-6) for x in xs]
    slope, icpt = _fit(xs, ys)
    ref = np.polyfit(xs, ys, 1)
    assert slope == pytest.approx(ref[0], rel=1e-9) and icpt == pytest.approx(ref[1], rel=1e-9)
    assert _fit([1, 2, 3], [3.0, 2.0, 1.0])[0] == 0.0  # a falling fit is clamped (profile fields are >= 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given on a machine without a GPU")
def test_no_gpu_is_a_clear_error():
    from msc.profile import run_profile
    from msc.spec import load_spec

    with pytest.raises(MscError, match="measures a GPU"):
        run_profile(load_spec(ROOT / "examples/mixtral-8x7b-h200.yaml"), batches=[16], contexts=[100, 200],
                    expert_tokens=[16])


def test_h200_profile_feeds_the_planner(tmp_path):
    """The profile measured on the H200 is valid planner input and changes the planner's colocated step to
    what was measured (docs/results/profile_mixtral_8x7b_h200.report.json), within 15 %."""
    import json

    from msc.planner.cost import cost_of_spec
    from msc.planner.hardware import get_gpu, load_catalogue
    from msc.planner.perf import Efficiency, colocated_step, load_profile
    from msc.planner.search import side_of
    from msc.spec import load_spec

    profile = load_profile(ROOT / "docs/results/profile_mixtral_8x7b_h200.json")
    report = json.loads((ROOT / "docs/results/profile_mixtral_8x7b_h200.report.json").read_text())
    cost, _ = cost_of_spec(load_spec(ROOT / "examples/mixtral-8x7b-h200.yaml"))
    side = side_of(get_gpu("H200", load_catalogue()), 1)
    for row in report["steps"]:
        predicted = colocated_step(cost, row["batch"], row["context"], side, Efficiency(), profile)
        assert abs(predicted / row["measured_s"] - 1) < 0.15, row


def _h200_planner(tmp_path, gpu="H200", profile=None):
    import yaml

    from msc.planner.cost import cost_of_spec
    from msc.planner.plan_spec import planner_for
    from msc.spec import load_spec

    d = yaml.safe_load((ROOT / "examples/plan-mixtral-8x7b-h200-profile.yaml").read_text())
    d["hardware"]["pool"]["gpu"] = gpu
    d["planner"]["profile"] = str(profile or ROOT / "docs/results/profile_mixtral_8x7b_h200.json")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(d))
    spec = load_spec(tmp_path / "s.yaml")
    return planner_for(spec, cost_of_spec(spec)[0])


def test_profile_keeps_the_search_at_its_tp_and_scales_k4_with_the_experts_a_node_holds(tmp_path):
    from msc.planner.perf import expected_experts_hit, expert_layer_time
    from msc.planner.search import side_of

    pl = _h200_planner(tmp_path)
    assert pl.tp_sizes == (1,)
    res = pl.search(top=3)
    assert res.plans and all(p.tp_a == 1 and p.tp_e == 1 for p in res.plans)
    assert res.colocated.gpus_per_instance == 1
    fit, lc, model = pl.profile.expert, pl.model.layers[0], pl.model
    side = side_of(pl.att_pool.gpu, 1)
    for per_node, tokens in ((8, 512), (2, 512), (1, 64)):
        pairs = tokens * model.top_k * per_node / lc.experts
        hit = expected_experts_hit(lc.experts, tokens, model.top_k) * per_node / lc.experts
        expected = fit.k3 * pairs + fit.k4 * hit / 8  # independent: the profile held 8 experts
        assert expert_layer_time(lc, tokens, per_node, side, pl.eff, model, pl.profile) == pytest.approx(expected)


def test_profile_of_another_gpu_is_refused(tmp_path):
    with pytest.raises(MscError, match="measured on 'NVIDIA H200'.*A100-80GB"):
        _h200_planner(tmp_path, gpu="A100-80GB")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="msc profile measures a GPU; this machine has none")
def test_profile_runs_on_a_gpu(tmp_path):
    """The whole profile on a small Mixtral-shaped model, colocated and as two role processes: fits whose
    predictions stay near their own measurements (median error under 25 %: at this size a step is mostly fixed costs;
    benchmarks/plan_calibration.py checks the full-size shape against separate runs)."""
    import yaml

    from msc.profile import run_profile
    from msc.spec import load_spec

    spec_file = tmp_path / "m.yaml"
    spec_file.write_text(yaml.safe_dump({
        "model": {"config": {"model_type": "mixtral", "vocab_size": 1024, "hidden_size": 512, "intermediate_size": 1024,
                             "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
                             "num_local_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 4096},
                  "dtype": "bfloat16"},
        "device": "cuda"}))
    report = run_profile(load_spec(spec_file), batches=[16, 32, 64], contexts=[128, 256], expert_tokens=[16, 64, 256],
                         say=lambda *_: None)
    assert {"k1", "k2", "k1_ctx"} <= set(report.profile["attention"]) and report.profile["expert"]["k3"] >= 0
    errors = sorted(abs(round(r["error"], 3)) for r in report.rows)
    assert all(r["measured_s"] > 0 for r in report.rows) and errors[len(errors) // 2] < 0.25, errors
    # two role processes ran; the fitted hand-off brings the planner's two-role step near theirs
    assert [r["batch"] for r in report.roles_rows] == [16, 32, 64] and report.profile["exchange"]["handoff_s"] >= 0
    errors = sorted(abs(round(r["error"], 3)) for r in report.roles_rows)
    assert all(r["measured_s"] > 0 for r in report.roles_rows) and errors[len(errors) // 2] < 0.25, errors


def test_the_measured_hand_off_is_part_of_every_exchange():
    """A profile's exchange.handoff_s adds to the link model's one-way time, in the step of every plan."""
    from msc.planner.cost import cost_of_spec
    from msc.planner.hardware import get_gpu, load_catalogue
    from msc.planner.perf import Efficiency, comm_time, disaggregated_step, load_profile
    from msc.planner.search import side_of
    from msc.spec import load_spec

    profile = load_profile(ROOT / "docs/results/profile_mixtral_8x7b_h200.json")
    with_handoff = type(profile).model_validate({**profile.model_dump(), "exchange": {"handoff_s": 40e-6, "how": "test"}})
    cost, _ = cost_of_spec(load_spec(ROOT / "examples/mixtral-8x7b-h200.yaml"))
    side, eff = side_of(get_gpu("H200", load_catalogue()), 1), Efficiency()
    base = comm_time(cost, 64, 128, 2, side, side, eff, 1.0, profile)
    assert comm_time(cost, 64, 128, 2, side, side, eff, 1.0, with_handoff) == pytest.approx(base + 40e-6, rel=1e-12)
    a = disaggregated_step(cost, 64, 1, 2, 2, 600, side, side, eff, profile)
    b = disaggregated_step(cost, 64, 1, 2, 2, 600, side, side, eff, with_handoff)
    moe_layers = sum(lc.moe for lc in cost.layers)
    assert b.t_c - a.t_c == pytest.approx(moe_layers * 40e-6, rel=1e-9)
    assert b.total - a.total == pytest.approx(2 * moe_layers * 40e-6, rel=1e-6)  # m = 1: both ways, every layer
