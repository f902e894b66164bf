"""The one engine on four families, colocated and disaggregated: with requests arriving while others decode,
every request's greedy output equals transformers' `generate` for that prompt alone.

Disaggregated runs are role processes (1 or 2 attention replicas, 2 expert nodes); together the cases
cover m = 1..4 ping-pong micro-batches. Arrivals are engine steps (the requests file's `arrivals`), so the
mix of prefill chunks and decodes is the same on every machine.
"""
from __future__ import annotations

import pytest

from msc.compiler import compile_spec
from msc.engine.build import build_engine
from msc.engine.request import SamplingParams
from msc.runtime.launcher import run_bundle
from msc.spec import parse_spec
from msc.verify import reference_generate

PROMPTS = [[5, 17, 42, 8], [7, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [9], [200, 100, 50, 25, 3]]
ARRIVALS = [0, 0, 2, 3, 5]
NEW = 7
# family -> ((attention replicas, m), ...) for the disaggregated runs
CASES = {"mixtral": ((1, 1), (2, 4)), "qwen3_moe": ((2, 2), (1, 3)), "deepseek_v3": ((1, 4), (2, 1)),
         "gpt_oss": ((2, 3), (1, 2))}


@pytest.fixture(scope="module", params=sorted(CASES))
def family(request, family_bundle):
    name = request.param
    d, bundle, hf = family_bundle(name)
    return name, d, bundle, [reference_generate(hf, p, NEW) for p in PROMPTS]


def test_colocated_engine(family, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _, _, bundle, refs = family
    gm = bundle.load_program(bundle.manifest["colocated"]["program"], "cpu")
    eng = build_engine(bundle.manifest, gm, "cpu")
    reqs = eng.generate(PROMPTS, SamplingParams(max_tokens=NEW), arrivals=ARRIVALS)
    assert [r.output for r in reqs] == refs
    assert any(r.decode and r.prefill for r in eng.records)  # prompts joined running decodes
    assert any(r.prefill and r.tokens == 9 for r in eng.records)  # a prompt chunk filled the step's budget


@pytest.mark.parametrize("case", [0, 1])
def test_disaggregated_engine(family, tmp_path, case):
    name, d, _, refs = family
    replicas, m = CASES[name][case]
    spec = parse_spec({**d, "plan": {**d["plan"], "attention": {"replicas": replicas}, "microbatches": m}})
    bundle = compile_spec(spec, tmp_path / "b")
    res = run_bundle(bundle.path, PROMPTS, NEW, arrivals=ARRIVALS)
    assert res["outputs"] == refs
    assert res["microbatches"] == m
    # a request that arrived later joined a step in which others were decoding, on some replica
    assert any(r["decode"] and r["prefill"] for recs in res["records"] for r in recs)


# family -> m of the run through the device exchange (one replica, 2 expert nodes): m = 1..4 across families
DEVICE_M = {"mixtral": 2, "qwen3_moe": 1, "deepseek_v3": 3, "gpt_oss": 4}


def test_device_exchange_engine(family, tmp_path):
    """Every step through the device exchange (msc.runtime.device_exchange; on the CPU its areas are /dev/shm
    files and its flags host loops): decode steps as they would be captured, prompt and mixed steps eagerly."""
    name, d, _, refs = family
    m = DEVICE_M[name]
    spec = parse_spec({**d, "plan": {**d["plan"], "attention": {"replicas": 1}, "microbatches": m}})
    bundle = compile_spec(spec, tmp_path / "b")
    res = run_bundle(bundle.path, PROMPTS, NEW, arrivals=ARRIVALS, env={"MSC_DEVICE_EXCHANGE": "on"})
    assert res["outputs"] == refs
    steps = [r for r in res["records"][0] if r["prefill"] or r["decode"]]
    assert any(r["prefill"] and r["decode"] for r in steps)  # mixed steps among them
    assert res["device_steps"][0] == len(steps)  # every step with tokens went through the device exchange
