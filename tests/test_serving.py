"""Serving: role processes kept up between requests, requests joining running batches (continuous batching),
streaming, cancellation and dead roles, against transformers' generate."""
from __future__ import annotations

import time

import pytest

from msc.compiler import compile_spec
from msc.engine.request import SamplingParams
from msc.errors import MscError
from msc.runtime.serving import ServingEngine
from msc.runtime.worker import FAULT_AFTER, FAULT_ROLE
from msc.spec import parse_spec
from msc.verify import reference_generate
from tests.conftest import tiny_spec_dict

PROMPTS = [[5, 17, 42], [7, 7], [1, 2, 3, 4, 5, 6], [9], [200, 100, 50, 25], [3, 1, 4, 1, 5]]
LIMITS = [8, 3, 5, 1, 6, 4]


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    eng = ServingEngine(tiny_bundle.path).start(timeout_s=180)
    yield eng
    eng.close()


def test_concurrent_requests_get_transformers_tokens_each_with_its_own_limit(engine, tiny_hf):
    handles = [engine.submit(p, n) for p, n in zip(PROMPTS, LIMITS)]
    done = [h.result(timeout=120) for h in handles]
    for p, n, c in zip(PROMPTS, LIMITS, done):
        ref = reference_generate(tiny_hf, p, n)
        assert c.token_ids == ref
        assert c.finish_reason == ("stop" if ref[-1] in engine.eos else "length")
        assert c.first_token_s is not None and 0 < c.first_token_s <= c.seconds
    h = engine.health()
    assert h["status"] == "ok" and h["served"] >= len(PROMPTS) and h["unfinished"] == 0


def test_a_short_request_that_arrives_while_a_long_one_decodes_finishes_first(engine, tiny_hf):
    """No rounds: the short request joins the running batch at the replica's next step."""
    long = engine.submit([5, 17, 42], 200)
    stream = long.stream(timeout=60)
    first = next(stream)  # the long request is decoding
    short = engine.submit([7, 7], 3).result(timeout=60)
    assert short.token_ids == reference_generate(tiny_hf, [7, 7], 3)
    assert not long.done() and len(long.tokens) < 200  # it was still decoding when the short one ended
    rest = [t for toks in stream for t in toks]
    assert first + rest == long.result(timeout=120).token_ids == reference_generate(tiny_hf, [5, 17, 42], 200)


def test_cancel_stops_a_request_and_frees_its_place(engine, tiny_hf):
    long = engine.submit([3, 4, 5], params=SamplingParams(max_tokens=3000, ignore_eos=True))
    next(long.stream(timeout=60))
    long.cancel()
    c = long.result(timeout=60)
    assert c.finish_reason == "cancelled" and 1 <= len(c.token_ids) < 3000
    assert engine.health()["unfinished"] == 0
    assert engine.generate([[11, 12, 13]], 5) == [reference_generate(tiny_hf, [11, 12, 13], 5)]


def test_seeded_sampling_is_repeatable_and_differs_by_seed(engine):
    p = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.95, seed=42, ignore_eos=True)
    a = engine.submit([5, 6], params=p).result(timeout=60).token_ids
    b = [engine.submit([5, 6], params=p), engine.submit([9, 9, 9], params=SamplingParams(max_tokens=7, temperature=0.5))]
    assert b[0].result(timeout=60).token_ids == a  # another request beside it changes nothing
    other = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.95, seed=43, ignore_eos=True)
    assert engine.submit([5, 6], params=other).result(timeout=60).token_ids != a


@pytest.mark.parametrize("prompt,limit,match", [
    ([5, 256], 4, r"token id 256 is outside the model's vocabulary \[0, 256\)"),
    ([], 4, "at least one token id"),
    ([5], 0, "max_new_tokens must be a positive integer, got 0"),
])
def test_bad_requests_are_refused_before_they_queue(engine, prompt, limit, match):
    with pytest.raises(MscError, match=match):
        engine.submit(prompt, limit)
    assert engine.health()["status"] == "ok"


def test_a_request_that_can_never_fit_fails_alone(engine, tiny_hf):
    # refused by admission (msc.admission) before anything reaches a role
    with pytest.raises(MscError, match=r"the prompt \(4000 tokens\) plus max_tokens \(500\) is 4500 tokens; "
                                       r"this deployment takes at most 4096 tokens per sequence"):
        engine.submit([1] * 4000, 500)
    assert engine.health()["status"] == "ok"
    assert engine.generate([[7, 7]], 3) == [reference_generate(tiny_hf, [7, 7], 3)]


def test_two_replicas_stay_up_through_an_idle_spell_longer_than_the_timeout(tmp_path, tiny_hf):
    """An idle replica sends the expert nodes heartbeats: their bounded waits (timeout_s) do not expire
    while the server is quiet; requests then spread over both replicas."""
    spec = parse_spec({**tiny_spec_dict(), "plan": {"attention": {"replicas": 2}, "experts": {"nodes": 2}, "batch_size": 2},
                       "runtime": {"timeout_s": 8}})
    bundle = compile_spec(spec, tmp_path / "b")
    eng = ServingEngine(bundle.path).start(timeout_s=180)
    try:
        assert eng.generate(PROMPTS[:3], 4) == [reference_generate(tiny_hf, p, 4) for p in PROMPTS[:3]]
        # NOTE: this sleep is the scenario (a quiet server for longer than every role's wait bound), not a
        # stand-in for synchronisation
        time.sleep(10)
        assert eng.health()["status"] == "ok"
        handles = [eng.submit(p, 4) for p in PROMPTS[3:]]
        done = [h.result(timeout=120) for h in handles]
        assert [c.token_ids for c in done] == [reference_generate(tiny_hf, p, 4) for p in PROMPTS[3:]]
        assert {c.replica for c in done} == {0, 1}
    finally:
        eng.close()
    assert [p.returncode for _, p in eng._procs] == [0, 0, 0, 0]  # a clean stop: every role ended by itself


def test_a_dead_expert_fails_the_requests_naming_it_within_5_s(tiny_bundle):
    """With restarts off the server stays broken (tests/test_reliability.py: restarts on)."""
    eng = ServingEngine(tiny_bundle.path, env={FAULT_ROLE: "expert.1", FAULT_AFTER: "2"}, max_restarts=0).start(timeout_s=180)
    try:
        t0 = time.monotonic()
        handles = [eng.submit([5, 17, 42], 50), eng.submit([3, 4], 50)]  # expert.1 dies in their first step
        for h in handles:
            with pytest.raises(MscError, match=r"role expert[.]1 \(rank 2\) exited with code 17"):
                h.result(timeout=120)
        assert time.monotonic() - t0 < 5.0  # a bound on failure detection, not a timing of the model
        exited = [p for r, p in eng._procs if r["name"] == "expert.1"][0]
        assert exited.returncode == 17
        assert eng.health()["status"] == "broken"
        with pytest.raises(MscError, match="cannot take requests: role expert[.]1"):
            eng.submit([1], 1)
    finally:
        eng.close(grace_s=10)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_serving_on_one_gpu_matches_hf(tmp_path, tiny_hf):
    """Two replicas and two expert nodes as four processes on one GPU (paged KV cache, Triton kernels,
    cuda_ipc): the tokens of transformers' generate."""
    d = tiny_spec_dict()
    d["device"] = "cuda"
    d["plan"] = {"attention": {"replicas": 2}, "experts": {"nodes": 2}, "batch_size": 2}
    bundle = compile_spec(parse_spec(d), tmp_path / "b")
    eng = ServingEngine(bundle.path).start(timeout_s=300)
    try:
        handles = [eng.submit(p, n) for p, n in zip(PROMPTS, LIMITS)]
        assert [h.result(timeout=300).token_ids for h in handles] == [reference_generate(tiny_hf, p, n) for p, n in zip(PROMPTS, LIMITS)]
    finally:
        eng.close()
    assert [p.returncode for _, p in eng._procs] == [0, 0, 0, 0]


def test_colocated_serving_is_the_same_engine_in_process(tiny_bundle, tiny_hf, monkeypatch):
    """`msc serve --colocated`: requests joining a running batch, cancel, and the HTTP app over it."""
    from fastapi.testclient import TestClient

    from msc.runtime.serving import ColocatedServingEngine
    from msc.server import create_app

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the CPU attention path, not the kernel in Triton's interpreter
    eng = ColocatedServingEngine(tiny_bundle.path, device="cpu").start()
    try:
        long = eng.submit([5, 17, 42], 100)
        next(long.stream(timeout=60))
        handles = [eng.submit(p, n) for p, n in zip(PROMPTS, LIMITS)]
        assert [h.result(timeout=60).token_ids for h in handles] == [reference_generate(tiny_hf, p, n) for p, n in zip(PROMPTS, LIMITS)]
        assert not long.done()  # the short ones joined while it decoded, and ended first
        long.cancel()
        assert long.result(timeout=60).finish_reason == "cancelled"
        with pytest.raises(MscError, match="at most 4096"):
            eng.submit([1] * 4090, 10).result(timeout=60)
        with TestClient(create_app(eng)) as c:
            r = c.post("/v1/generate", json={"prompt_token_ids": [7, 7], "max_new_tokens": 5})
            assert r.status_code == 200 and r.json()["token_ids"] == reference_generate(tiny_hf, [7, 7], 5)
            assert c.get("/health").json()["roles"] == ["colocated"]
    finally:
        eng.close()
    assert eng.health()["unfinished"] == 0
