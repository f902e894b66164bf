"""The ping-pong micro-batch pipeline end to end: same tokens for every m, and real overlap of the sides."""
import json
import statistics

import pytest
from typer.testing import CliRunner

from msc.cli import app
from msc.compiler import compile_spec
from msc.errors import MscError
from msc.runtime.launcher import run_bundle
from msc.spec import parse_spec
from msc.trace_plot import ideal_step_time
from msc.verify import max_logit_error, reference_generate
from tests.conftest import tiny_spec_dict

PROMPTS = [[5, 17, 42, 100, 3], [7, 7], [1, 2, 3, 4, 5, 6, 200, 9], [9, 9, 9], [4]]


@pytest.fixture(scope="module")
def refs(tiny_hf):
    return [reference_generate(tiny_hf, p, 6) for p in PROMPTS]


def test_plan_microbatches_reach_the_runtime_and_tokens_match_hf(tmp_path, tiny_hf, refs):
    bundle = compile_spec(parse_spec(tiny_spec_dict(microbatches=3)), tmp_path / "b")
    assert bundle.manifest["pipeline"]["microbatches"] == 3
    assert bundle.manifest["pipeline"]["stages"]["attention"] == 3  # 2 layers: 2 dispatching stages + the head
    res = run_bundle(bundle.path, PROMPTS, 6, dump_logits=True)
    assert res["microbatches"] == 3
    assert res["outputs"] == refs
    assert max_logit_error(tiny_hf, PROMPTS, res["outputs"], res["logits"]) < 1e-4


@pytest.mark.parametrize("m", [1, 2, 4])
def test_every_microbatch_count_gives_the_same_tokens_and_logits(tiny_bundle, tiny_hf, refs, m):
    res = run_bundle(tiny_bundle.path, PROMPTS, 6, microbatches=m, dump_logits=True)
    assert res["microbatches"] == m
    assert res["outputs"] == refs
    assert max_logit_error(tiny_hf, PROMPTS, res["outputs"], res["logits"]) < 1e-4


def test_two_replicas_with_different_microbatch_counts_share_the_expert_nodes(tmp_path, refs):
    # 5 prompts over 2 replicas: 3 and 2 sequences, so with m = 3 one replica sends 3 micro-batches and
    # the other 2; the expert nodes gather micro-batch 2 from the first replica only.
    spec = parse_spec(tiny_spec_dict(microbatches=3, attention={"replicas": 2}))
    res = run_bundle(compile_spec(spec, tmp_path / "b").path, PROMPTS, 6)
    assert res["outputs"] == refs


def test_bad_microbatch_override_is_one_clear_error(tiny_bundle):
    with pytest.raises(MscError, match="microbatches must be an integer from 1 to 8"):
        run_bundle(tiny_bundle.path, PROMPTS, 2, microbatches=9)


# ---------------------------------------------------------------------------------------------- overlap
def _intervals(trace: dict, prefix: str, lo: float, hi: float) -> list[tuple[float, float]]:
    """Compute intervals (µs) of the roles whose name starts with `prefix`, clipped to [lo, hi], merged."""
    names = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "process_name"}
    spans = sorted((max(e["ts"], lo), min(e["ts"] + e["dur"], hi)) for e in trace["traceEvents"]
                   if e["ph"] == "X" and e["tid"] == 0 and e["cat"] == "compute" and names[e["pid"]].startswith(prefix))
    merged: list[list[float]] = []
    for a, b in spans:
        if b <= a:
            continue
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def _both_busy_fraction(trace: dict) -> float:
    """Share of the decode steps' time in which the attention side and some expert node both compute."""
    steps = [e for e in trace["traceEvents"] if e.get("cat") == "step" and e["args"]["step"] >= 1]
    lo, hi = min(e["ts"] for e in steps), max(e["ts"] + e["dur"] for e in steps)
    att, exp = _intervals(trace, "attention", lo, hi), _intervals(trace, "expert", lo, hi)
    both = sum(max(0.0, min(b, d) - max(a, c)) for a, b in att for c, d in exp)
    return both / (hi - lo)


def test_pipeline_overlaps_the_sides_and_reaches_the_ideal_step_time(tiny_bundle, refs, tmp_path):
    """Equal injected delays d per layer on both sides. m = 1 cannot overlap (2·L·d per step); m = 3 should
    come within 25 % of the ping-pong formula with T_a = T_e = d/3 and no communication time."""
    d_ms, layers = 100.0, tiny_bundle.manifest["model"]["num_hidden_layers"]
    step, overlap = {}, {}
    for m in (1, 3):
        trace = tmp_path / f"trace{m}.json"
        res = run_bundle(tiny_bundle.path, PROMPTS, 4, microbatches=m, delay_ms={"attention": d_ms, "expert": d_ms}, trace=trace)
        assert res["outputs"] == [r[:4] for r in refs]
        step[m] = statistics.median(res["step_times"][0][1:])  # decode steps (step 0 is the prefill)
        overlap[m] = _both_busy_fraction(json.loads(trace.read_text()))
    ideal = ideal_step_time(d_ms / 3e3, d_ms / 3e3, 0.0, 3, layers)
    assert 0.95 * ideal <= step[3] <= 1.25 * ideal, (step, ideal)
    assert step[3] < 0.8 * step[1], step
    assert overlap[1] < 0.05 and overlap[3] > 0.4, overlap
    # and the timeline can be drawn from the CLI
    res = CliRunner().invoke(app, ["trace-plot", str(tmp_path / "trace3.json"), "-o", str(tmp_path / "t.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "t.png").stat().st_size > 10_000


def test_microbatches_without_the_pipeline_pass_is_refused_and_nothing_written(tmp_path):
    passes = [{"name": n} for n in ["annotate_roles", "split_roles", "place_experts", "insert_dispatch_combine", "lower_roles"]]
    spec = parse_spec({**tiny_spec_dict(microbatches=2), "passes": passes})
    with pytest.raises(MscError, match="needs the pipeline_microbatches pass"):
        compile_spec(spec, tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("m", [1, 3])
def test_stage_graph_bookkeeping_gives_the_same_tokens(tmp_path, tiny_hf, m):
    """The attention role's decode steps through msc.engine.stage_graphs (MSC_STAGE_GRAPHS=emulate: the static
    buffers, padding to batch buckets, per-bucket step metadata and cloned outputs of the CUDA-graph path,
    without CUDA), two replicas, requests joining while others decode: transformers' tokens."""
    spec = parse_spec({**tiny_spec_dict(microbatches=m), "plan": {"attention": {"replicas": 2}, "experts": {"nodes": 2},
                                                                  "microbatches": m}})
    bundle = compile_spec(spec, tmp_path / "b")
    prompts = PROMPTS + [[3, 1, 4, 1, 5, 9, 2, 6]]
    res = run_bundle(bundle.path, prompts, 9, arrivals=[0, 0, 2, 3, 5, 6], env={"MSC_STAGE_GRAPHS": "emulate"})
    assert res["outputs"] == [reference_generate(tiny_hf, p, 9) for p in prompts]
    assert all(n > 0 for n in res["captured_segments"])
