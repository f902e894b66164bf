"""Automatic prefix caching (msc/runtime/prefix_cache.py, PagedKVCache's shared pages, the scheduler's admission):
the page bookkeeping on its own, then the engine on the tiny Mixtral's colocated program (CPU, float32) and as
role processes, every output checked against transformers' generate of that prompt alone, and the saving read
from the engine's step records (prompt tokens computed) rather than assumed."""
from __future__ import annotations

import pytest
import torch

from msc.compiler import compile_spec
from msc.engine.engine import Engine
from msc.engine.request import SamplingParams
from msc.engine.runner import ModelRunner
from msc.errors import MscError
from msc.runtime.launcher import run_bundle
from msc.runtime.paged_kv import PagedKVCache
from msc.runtime.prefix_cache import ROOT, chain
from msc.spec import parse_spec
from msc.verify import reference_generate
from tests.conftest import tiny_spec_dict

SYSTEM = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79, 50, 28, 84, 19, 71, 69]  # 22 tokens


@pytest.fixture(autouse=True)
def _plain_cpu_attention(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for name in ("MSC_OVERLAP", "MSC_PREFIX_CACHE"):
        monkeypatch.delenv(name, raising=False)


def _engine(bundle, program, **kw) -> Engine:
    runner = ModelRunner(program, bundle.manifest["model"]["num_hidden_layers"], "cpu")
    return Engine(runner, [bundle.manifest["model"]["eos_token_id"]], vocab_size=256,
                  **{"max_batch": 4, "max_step_tokens": 64, "max_seq_len": 128, "page_size": 4, **kw})


def _computed(eng: Engine, rid: str) -> int:
    """Prompt tokens the engine fed for a request (its step records), cached ones excluded."""
    return sum(n for r in eng.records for q, n in r.prefill if q == rid)


# ------------------------------------------------------------------ the page bookkeeping
def _cache(blocks=6, page=4) -> PagedKVCache:
    c = PagedKVCache(1, blocks, page, 1, 2, 2, torch.float32, "cpu", 64)
    c.enable_prefix_cache()
    return c


def test_a_page_name_covers_its_whole_prefix():
    a, b = [1, 2, 3, 4], [5, 6, 7, 8]
    assert chain(chain(ROOT, a), b) != chain(chain(ROOT, b), b)  # the same tokens after another prefix
    assert chain(ROOT, a) == chain(ROOT, list(a)) and chain(ROOT, a) != chain(ROOT, [1, 2, 3, 5])


def test_shared_pages_are_counted_parked_and_evicted_least_recently_used_first():
    c = _cache(blocks=6)
    toks = list(range(100, 112))  # 3 full pages
    c.add_sequence(0)
    assert c.attach_prefix(0, 12, lambda s, n: toks[s:s + n]) == 0  # nothing cached yet
    c.ensure(0, 12)
    c.name_pages(0, 12, lambda s, n: toks[s:s + n])
    assert len(c.prefix) == 3
    # a second sequence with the same 12 tokens attaches 2 pages: never the page of its last token
    c.add_sequence(1)
    assert c.attach_prefix(1, 12, lambda s, n: toks[s:s + n]) == 8
    assert c.blocks(1) == c.blocks(0)[:2] and c.blocks_in_use == 3
    c.drop_sequence(0)  # its 3rd page is named and unheld: cached; the 2 shared ones are still held by seq 1
    assert c.allocator.num_free == 3 and c.num_free == 4 and c.blocks_in_use == 2
    c.drop_sequence(1)
    assert c.num_free == 6 and c.blocks_in_use == 0 and len(c.prefix.evictable) == 3
    # a sequence that needs 5 pages takes the 3 free ones and then evicts the 2 least recently parked
    lru = list(c.prefix.evictable)
    c.add_sequence(2)
    c.ensure(2, 20)
    assert len(c.prefix) == 1 and list(c.prefix.evictable) == lru[2:]
    assert set(lru[:2]) <= set(c.blocks(2))


def test_a_page_already_named_by_another_block_stays_private():
    """Two sequences that computed the same prompt at once: the first names its pages, the second's stay its
    own and are freed with it (never parked under a name that points elsewhere)."""
    c = _cache(blocks=6)
    toks = list(range(8))
    for s in (0, 1):
        c.add_sequence(s)
        c.ensure(s, 8)
        c.name_pages(s, 8, lambda st, n: toks[st:st + n])
    assert len(c.prefix) == 2 and set(c.prefix.name_of) == set(c.blocks(0))
    c.drop_sequence(1)
    assert c.allocator.num_free == 4 and not c.prefix.evictable  # 2 never taken, 2 of seq 1 back


def test_state_layers_refuse_prefix_caching():
    c = PagedKVCache(1, 4, 4, 1, 2, 2, torch.float32, "cpu", 16)
    c.states = object()
    with pytest.raises(MscError, match="state layers"):
        c.enable_prefix_cache()


# ------------------------------------------------------------------ the engine
def test_a_shared_prefix_is_computed_once_and_the_tokens_are_transformers(tiny_bundle, program, tiny_hf):
    prompts = [SYSTEM + [7, 7, 1], SYSTEM + [200, 100], SYSTEM + [9], SYSTEM[:13]]
    eng = _engine(tiny_bundle, program)
    reqs = eng.generate(prompts, SamplingParams(max_tokens=6), arrivals=[0, 2, 3, 4])
    assert [r.output for r in reqs] == [reference_generate(tiny_hf, p, 6) for p in prompts]
    assert _computed(eng, reqs[0].id) == len(prompts[0])
    for r, p in zip(reqs[1:3], prompts[1:3]):  # the system prompt's 5 full pages came from the cache
        assert _computed(eng, r.id) == len(p) - 20
    assert _computed(eng, reqs[3].id) == 13 - 12  # 3 of its 4 pages are cached; its last token is computed
    stats = eng.stats()
    assert stats["prefix_cache_hit_tokens"] == 20 + 20 + 12
    assert stats["prefix_cache_queried_tokens"] == sum(len(p) for p in prompts)
    assert eng.scheduler.cache.num_free == eng.num_pages  # every page back (cached ones evictable)


def test_the_same_tokens_with_prefix_caching_off(tiny_bundle, program, tiny_hf):
    prompts = [SYSTEM + [1], SYSTEM + [2]]
    eng = _engine(tiny_bundle, program, prefix_caching=False)
    reqs = eng.generate(prompts, SamplingParams(max_tokens=4), arrivals=[0, 3])
    assert [_computed(eng, r.id) for r in reqs] == [23, 23] and "prefix_cache_hit_tokens" not in eng.stats()
    assert [r.output for r in reqs] == [reference_generate(tiny_hf, p, 4) for p in prompts]


def test_a_chat_turn_finds_the_previous_turn_and_its_answer(tiny_bundle, program, tiny_hf):
    """Pages filled by generated tokens are named too: the next turn (prompt + answer + new text) reuses them."""
    eng = _engine(tiny_bundle, program)
    first = eng.generate([SYSTEM], SamplingParams(max_tokens=9))[0]
    turn = SYSTEM + first.output + [42, 43]  # 33 tokens; K/V exist for the first 30 (the last answer token has none)
    second = eng.generate([turn], SamplingParams(max_tokens=5))[0]
    assert second.output == reference_generate(tiny_hf, turn, 5)
    assert _computed(eng, second.id) == len(turn) - 28  # 7 full pages: 5 of the prompt, 2 holding answer tokens


@pytest.mark.parametrize("overlap", [False, True])
def test_preemption_and_eviction_under_a_small_pool(tiny_bundle, program, tiny_hf, overlap):
    """A pool of 14 pages for 4 requests of up to 8 pages each: requests are preempted and cached pages evicted,
    and every output is still transformers' (overlapped steps too, where a pending token is named only once it
    lands)."""
    prompts = [SYSTEM + [1, 2], SYSTEM + [3], SYSTEM[:17] + [4, 4, 4], [8, 6, 7, 5, 3, 0, 9] * 3]
    eng = _engine(tiny_bundle, program, kv_tokens=56, overlap=overlap)
    reqs = eng.generate(prompts, SamplingParams(max_tokens=8), arrivals=[0, 0, 1, 1])
    assert [r.output for r in reqs] == [reference_generate(tiny_hf, p, 8) for p in prompts]
    assert any(r.preempted for r in eng.records)
    assert eng.stats()["prefix_cache_hit_tokens"] > 0
    assert eng.scheduler.cache.num_free == eng.num_pages


def test_sampled_requests_with_a_cached_prefix_match_uncached_ones(tiny_bundle, program):
    """Seeded sampling and log-probabilities do not depend on where the prefix's K/V came from."""
    params = SamplingParams(max_tokens=6, temperature=0.8, top_k=20, seed=11, logprobs=2)
    runs = []
    for caching in (True, False):
        eng = _engine(tiny_bundle, program, prefix_caching=caching)
        reqs = eng.generate([SYSTEM + [5], SYSTEM + [5]], params, arrivals=[0, 3])
        runs.append([(r.output, r.logprobs) for r in reqs])
    (cached_out, cached_lp), (plain_out, plain_lp) = runs[0][1], runs[1][1]
    assert cached_out == plain_out
    for (a, _), (b, _) in zip(cached_lp, plain_lp):
        assert a == pytest.approx(b, abs=1e-4)


def test_default_is_off_for_state_layers_and_forcing_it_is_refused(tiny_bundle, program, monkeypatch):
    class _StateRunner(ModelRunner):
        def make_cache(self, num_blocks, page_size, max_seq_len):
            cache = super().make_cache(num_blocks, page_size, max_seq_len)
            cache.states = _NoStates()
            return cache

    class _NoStates:
        def add(self, seq_id): ...

        def drop(self, seq_id): ...

    def engine(**kw):
        runner = _StateRunner(program, tiny_bundle.manifest["model"]["num_hidden_layers"], "cpu")
        return Engine(runner, [2], max_batch=2, max_seq_len=64, **kw)

    assert engine().scheduler.cache.prefix is None
    with pytest.raises(MscError, match="prefix caching: this model has state layers"):
        engine(prefix_caching=True)
    monkeypatch.setenv("MSC_PREFIX_CACHE", "0")
    assert _engine(tiny_bundle, program).scheduler.cache.prefix is None


@pytest.mark.parametrize("m", [1, 2])
def test_role_processes_cache_prefixes_per_replica(tmp_path, tiny_hf, m):
    """The attention role's engine (experts remote, two expert nodes; m ping-pong micro-batches) with a shared
    prefix: transformers' tokens, and the replica's records show the cached tokens."""
    spec = parse_spec({**tiny_spec_dict(microbatches=m), "runtime": {"prefix_caching": True}})
    bundle = compile_spec(spec, tmp_path / "b")
    prompts = [SYSTEM + [7], SYSTEM + [8, 9], SYSTEM[:16] + [1]]
    res = run_bundle(bundle.path, prompts, 5, arrivals=[0, 2, 3])
    assert res["outputs"] == [reference_generate(tiny_hf, p, 5) for p in prompts]
    cached = sorted(n for recs in res["records"] for r in recs for _, n in r["cached"])
    assert cached == [16, 16]  # page 16: the system prompt's one full page; the third prompt's too
