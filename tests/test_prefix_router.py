"""Prefix-aware placement of served requests over attention replicas (msc/runtime/prefix_router.py): the rule on
its own, then a server with two replicas whose requests share two system prompts, against transformers."""
from __future__ import annotations

import pytest

import msc.runtime.prefix_router as pr
from msc.compiler import compile_spec
from msc.runtime.prefix_cache import ROOT, chain
from msc.runtime.prefix_router import PrefixRouter
from msc.runtime.serving import ServingEngine
from msc.spec import parse_spec
from msc.verify import reference_generate
from tests.conftest import tiny_spec_dict

A = list(range(10, 43))  # 33 tokens: two full pages of 16
B = list(range(100, 133))


def test_a_prefix_follows_its_replica_within_the_slack():
    r = PrefixRouter(16, slack=2)
    assert r.place(A + [1], [0, 0, 0]) == 0  # nothing remembered: the least loaded, lowest index
    assert r.place(B + [1], [1, 0, 0]) == 1
    assert r.place(A + [2], [1, 1, 0]) == 0  # A's replica, though replica 2 is idle (within the slack)
    assert r.place(A + [3], [3, 1, 0]) == 2  # 3 > 0 + 2: too busy, the least loaded takes it ...
    assert r.place(A + [4], [3, 1, 1]) == 2  # ... and the prefix follows it there
    assert r.routed_by_prefix == 2


def test_short_prompts_and_the_longest_remembered_prefix():
    r = PrefixRouter(16, slack=8)
    assert r.place([1, 2, 3], [0, 0]) == 0 and r.place([1, 2, 3], [1, 0]) == 1  # no full page: by load only
    assert r.place(A[:17], [0, 0]) == 0  # its first page named at 0
    assert r.place(A + [5], [0, 1]) == 0  # one page in common with it: replica 0 (and both pages now named at 0)
    r._replica_of[chain(chain(ROOT, A[:16]), A[16:32])] = 1  # A's second page last went to replica 1
    assert r.place(A + [6], [0, 0]) == 1  # the longer match wins


def test_the_memory_is_bounded(monkeypatch):
    monkeypatch.setattr(pr, "MAX_NAMES", 5)
    r = PrefixRouter(4)
    for i in range(10):
        r.place([i] * 13, [0, 0])  # 3 pages each
    assert len(r._replica_of) == 5


def test_two_replicas_serve_each_system_prompt_from_one_cache(tmp_path, tiny_hf):
    """Four requests of each of two system prompts: the first of each (sent together) find a replica by load,
    the other six (sent together once those are done) follow their prefix, so each replica computes its system
    prompt once and the six find it cached; every answer is transformers'."""
    spec = parse_spec({**tiny_spec_dict(), "plan": {"attention": {"replicas": 2}, "experts": {"nodes": 2},
                                                     "batch_size": 8}})
    bundle = compile_spec(spec, tmp_path / "b")
    prompts = [(A if i % 2 == 0 else B) + [7 + i] for i in range(8)]
    eng = ServingEngine(bundle.path).start(timeout_s=180)
    try:
        first = [eng.submit(p, 3) for p in prompts[:2]]
        done = [h.result(timeout=120) for h in first]
        rest = [eng.submit(p, 3) for p in prompts[2:]]
        done += [h.result(timeout=120) for h in rest]
        stats = eng.stats()
    finally:
        eng.close()
    assert [c.token_ids for c in done] == [reference_generate(tiny_hf, p, 3) for p in prompts]
    assert {done[i].replica for i in range(0, 8, 2)} == {0} and {done[i].replica for i in range(1, 8, 2)} == {1}
    assert eng._router.routed_by_prefix == 6
    assert stats["prefix_cache_queried_tokens"] == 8 * 34 and stats["prefix_cache_hit_tokens"] == 6 * 32


@pytest.mark.parametrize("env", [{"MSC_PREFIX_CACHE": "0"}, None])
def test_no_router_without_caching_or_with_one_replica(tiny_bundle, tmp_path, env):
    if env is None:  # one replica
        eng = ServingEngine(tiny_bundle.path)
    else:
        spec = parse_spec({**tiny_spec_dict(), "plan": {"attention": {"replicas": 2}, "experts": {"nodes": 2}}})
        eng = ServingEngine(compile_spec(spec, tmp_path / "b").path, env=env)
    assert eng._router is None
