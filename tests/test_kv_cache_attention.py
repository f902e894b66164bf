"""The engine's paged KV cache on general steps (msc/runtime/paged_kv.py: `StepMeta.for_step`, `paged_attention`
with prompt chunks after a cached prefix, decode tokens beside them, sinks) against a float64 per-sequence
reference. The small `Paged` harness below drives the cache the way the engine's runner does: one StepMeta
per step, built from each sequence's cached length and new tokens, shared by every layer.

The reference keeps each sequence's whole key/value history itself and computes, for every new query
token at absolute position p and every query head h (kv head h // (nh / nkv), as transformers' `repeat_kv`),
a softmax over the allowed keys written out with explicit loops, plus (GPT-OSS) one sink logit per head
that joins the denominator and carries no value.

Sliding-window convention: a query at position p sees keys j with  p - window < j <= p,  i.e. the last
`window` keys including itself. This is transformers' convention: `causal_mask_function` (kv_idx <= q_idx)
and-ed with `sliding_window_overlay(window)` (kv_idx > q_idx - window) in `transformers/masking_utils.py`;
`test_window_convention_is_transformers` checks the reference's rule against those very functions, and
`test_visible_keys_reveal_the_mask` reads the set of keys the code under test lets each query see.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from msc.runtime.paged_kv import PagedKVCache, StepMeta, paged_attention

F64 = torch.float64


@pytest.fixture(autouse=True)
def _plain_cpu_attention(monkeypatch):
    # the CPU path; the Triton decode kernel (power-of-two head dims) has its own tests in tests/kernels
    monkeypatch.setenv("TRITON_INTERPRET", "0")


class StepLayout:
    """Which sequences a step's T tokens belong to: seq_ids[i] owns lengths[i] tokens, packed in order."""

    def __init__(self, seq_ids, lengths):
        self.seq_ids, self.lengths = list(seq_ids), list(lengths)


class Paged:
    """The paged cache with 4-token pages, made at its first step (when the head shapes are known)."""

    def __init__(self, num_layers: int):
        self.num_layers, self.cache, self.ctx = num_layers, None, {}
        self.meta = None

    def add_sequence(self, s):
        self.ctx[s] = 0
        if self.cache is not None:
            self.cache.add_sequence(s)

    def drop_sequence(self, s):
        self.cache.drop_sequence(s)
        del self.ctx[s]

    def begin(self, layout, k, v):
        if self.cache is None:
            self.cache = PagedKVCache(self.num_layers, 64, 4, k.shape[1], k.shape[3], v.shape[3], k.dtype, "cpu", 128)
            for s in self.ctx:
                self.cache.add_sequence(s)
        self.meta = StepMeta.for_step(self.cache, layout.seq_ids, [self.ctx[s] for s in layout.seq_ids], layout.lengths)
        self.layout = layout

    def end(self):
        for s, n in zip(self.layout.seq_ids, self.layout.lengths):
            self.ctx[s] += n


def KVCache(num_layers):  # noqa: N802 (the old name, kept for the tests below)
    return Paged(num_layers)


def cached_attention(cache: Paged, layout, q, k, v, layer, scaling, window, sinks=None):
    """One layer of a one-layer-at-a-time test step: begin, attend, end."""
    cache.begin(layout, k, v)
    out = paged_attention(cache.cache, layer, q, k, v, cache.meta, scaling, window, sinks)
    cache.end()
    return out


# ------------------------------------------------------------------------------------------ reference
def allowed(p: int, j: int, window: int) -> bool:
    """Query at absolute position p may attend to key j (see the module docstring)."""
    return j <= p and (window <= 0 or j > p - window)


def ref_attention(q, k_hist, v_hist, positions, scaling, window, sinks=None):
    """q [nh, n, dk] (new tokens at absolute `positions`), k_hist [nkv, S, dk], v_hist [nkv, S, dv] -> [n, nh, dv]."""
    nh, n, _ = q.shape
    nkv, s, dv = v_hist.shape
    rep = nh // nkv
    out = torch.zeros(n, nh, dv, dtype=F64)
    for h in range(nh):
        kvh = h // rep
        for i, p in enumerate(positions):
            js = [j for j in range(s) if allowed(p, j, window)]
            logits = [scaling * float(q[h, i].to(F64) @ k_hist[kvh, j].to(F64)) for j in js]
            extra = [] if sinks is None else [float(sinks[h])]
            m = max(logits + extra)
            ex = [math.exp(x - m) for x in logits]
            denom = sum(ex) + sum(math.exp(x - m) for x in extra)
            for e, j in zip(ex, js):
                out[i, h] += (e / denom) * v_hist[kvh, j].to(F64)
    return out


class Reference:
    """Each sequence's K/V history, kept by the test; answers one step like cached_attention should."""

    def __init__(self):
        self.k, self.v = {}, {}

    def step(self, layout, q, k, v, scaling, window, sinks=None):
        t = q.shape[2]
        out = torch.zeros(t, q.shape[1], v.shape[-1], dtype=F64)
        start = 0
        for sid, n in zip(layout.seq_ids, layout.lengths):
            kk, vv = k[0, :, start:start + n].to(F64), v[0, :, start:start + n].to(F64)
            self.k[sid] = kk if sid not in self.k else torch.cat([self.k[sid], kk], dim=1)
            self.v[sid] = vv if sid not in self.v else torch.cat([self.v[sid], vv], dim=1)
            s = self.k[sid].shape[1]
            out[start:start + n] = ref_attention(q[0, :, start:start + n], self.k[sid], self.v[sid],
                                                 list(range(s - n, s)), scaling, window, sinks)
            start += n
        return out


def _qkv(g, t, nh, nkv, dk, dv, dtype=F64):
    q = torch.randn(1, nh, t, dk, generator=g, dtype=F64).to(dtype)
    k = torch.randn(1, nkv, t, dk, generator=g, dtype=F64).to(dtype)
    v = torch.randn(1, nkv, t, dv, generator=g, dtype=F64).to(dtype)
    return q, k, v


# prefill of 0 and 1, then decode steps, a late prefill (2), a chunked prefill of 2, packed in varied orders
STEPS = [
    [(0, 6), (1, 3)],
    [(1, 1), (0, 1)],
    [(0, 1), (2, 5), (1, 1)],
    [(2, 3), (0, 1)],
    [(1, 1), (2, 1), (0, 1)],
]


def _run(steps, nh, nkv, dk, dv, window, sinks=None, dtype=F64, seed=0, layers=(0,)):
    g = torch.Generator().manual_seed(seed)
    cache = KVCache(num_layers=max(layers) + 1)
    refs = {layer: Reference() for layer in layers}
    scaling = dk ** -0.5
    for sid in {s for step in steps for s, _ in step}:
        cache.add_sequence(sid)
    results = []
    for step in steps:
        layout = StepLayout([s for s, _ in step], [n for _, n in step])
        t = sum(layout.lengths)
        for i, layer in enumerate(layers):
            q, k, v = _qkv(g, t, nh, nkv, dk, dv, dtype)
            if i == 0:
                cache.begin(layout, k, v)  # one meta per step, shared by its layers (as the engine's runner does)
            got = paged_attention(cache.cache, layer, q, k, v, cache.meta, scaling, window, sinks)
            assert got.shape == (1, t, nh, dv) and got.dtype == dtype
            want = refs[layer].step(layout, q, k, v, scaling, window, None if sinks is None else sinks.to(F64))
            results.append((got[0].to(F64), want))
        cache.end()
    return results


def hf_rule(window: int):
    """transformers' mask for a query at q_idx and key kv_idx: `causal_mask_function` and, with a window,
    `sliding_window_overlay(window)` (what `create_sliding_window_causal_mask` and-s together)."""
    from transformers.masking_utils import causal_mask_function, sliding_window_overlay

    overlay = sliding_window_overlay(window) if window > 0 else None
    return lambda q_idx, kv_idx: bool(causal_mask_function(0, 0, q_idx, kv_idx)) and (
        overlay is None or bool(overlay(0, 0, q_idx, kv_idx)))


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("nh,nkv", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("window", [-1, 1, 3])
@pytest.mark.parametrize("dk,dv", [(8, 8), (8, 5)])
def test_against_reference(nh, nkv, window, dk, dv):
    """Causal prefill + decode from the cache; GQA; dv != dk (as DeepSeek MLA); sliding windows of 1 and 3."""
    for got, want in _run(STEPS, nh, nkv, dk, dv, window):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("nh,nkv", [(4, 4), (4, 2)])
@pytest.mark.parametrize("window", [-1, 3])
@pytest.mark.parametrize("dk,dv", [(8, 8), (8, 5)])
def test_sinks_against_reference(nh, nkv, window, dk, dv):
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=F64)[:nh]
    for got, want in _run(STEPS, nh, nkv, dk, dv, window, sinks=sinks):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("nh,nkv", [(4, 4), (4, 2)])
@pytest.mark.parametrize("window", [-1, 3])
def test_device_only_sink_decode_matches_the_reference(monkeypatch, nh, nkv, window):
    """The decode path a GPU takes for models with sinks (device gathers only, CUDA-graph safe), run here on
    the CPU: the same float64 reference as the gathered path."""
    import msc.runtime.paged_kv as pk

    monkeypatch.setattr(pk, "_graph_safe_decode", lambda q: True)
    calls = []
    real = pk.decode_on_device
    monkeypatch.setattr(pk, "decode_on_device", lambda *a: calls.append(1) or real(*a))
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=F64)[:nh]
    for got, want in _run(STEPS, nh, nkv, 8, 5, window, sinks=sinks):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert len(calls) == sum(all(n == 1 for _, n in step) for step in STEPS) > 0  # every pure decode step took it


def test_sinks_keep_float64_precision():
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=F64)
    for got, want in _run(STEPS, 4, 2, 8, 8, -1, sinks=sinks):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_float32_inputs():
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float32)
    for s in (None, sinks):
        for got, want in _run(STEPS, 4, 2, 8, 6, 3, sinks=s, dtype=torch.float32):
            torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_minus_inf_sinks_are_no_sinks():
    none = _run(STEPS, 4, 2, 8, 6, 3, sinks=None, seed=3)
    neg = _run(STEPS, 4, 2, 8, 6, 3, sinks=torch.full((4,), float("-inf"), dtype=F64), seed=3)
    for (a, _), (b, _) in zip(none, neg):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_layers_have_separate_caches():
    for got, want in _run(STEPS, 4, 2, 8, 6, -1, layers=(0, 1, 2)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_window_convention_is_transformers():
    for window in (-1, 1, 2, 3, 5):
        hf = hf_rule(window)
        for p in range(9):
            for j in range(9):
                assert allowed(p, j, window) == hf(p, j), (window, p, j)


@pytest.mark.parametrize("window", [-1, 1, 3])
def test_visible_keys_reveal_the_mask(window):
    """q = 0 makes every visible key weigh the same, and v = one-hot(position) reads the weights back: the
    set of keys the code lets each query see, over a prefill of 5 then two decode steps, is transformers'
    causal (+ sliding window) mask."""
    hf = hf_rule(window)
    total = 7
    cache = KVCache(1)
    cache.add_sequence(0)
    pos = 0
    for n in (5, 1, 1):
        q = torch.zeros(1, 2, n, 4, dtype=F64)
        k = torch.randn(1, 1, n, 4, dtype=F64)
        v = torch.eye(total, dtype=F64)[pos:pos + n].reshape(1, 1, n, total)
        out = cached_attention(cache, StepLayout([0], [n]), q, k, v, 0, 0.5, window)  # [1, n, 2, total]
        for i in range(n):
            p = pos + i
            seen = {j for j in range(total) if out[0, i, 0, j] > 0}
            assert seen == {j for j in range(p + 1) if hf(p, j)}, (p, seen)
            torch.testing.assert_close(out[0, i, 1], out[0, i, 0])
        pos += n


def test_packed_sequences_do_not_see_each_other():
    """Sequence 0 gets the same output alone as packed between sequences 1 and 2, whatever their tokens are."""
    g = torch.Generator().manual_seed(5)
    nh, nkv, dk, dv = 4, 2, 8, 6
    alone, packed = KVCache(1), KVCache(1)
    for c in (alone, packed):
        for s in (0, 1, 2):
            c.add_sequence(s)
    for n0, n1, n2 in [(4, 3, 2), (1, 1, 1), (2, 1, 3)]:
        q0, k0, v0 = _qkv(g, n0, nh, nkv, dk, dv)
        q1, k1, v1 = _qkv(g, n1, nh, nkv, dk, dv)
        q2, k2, v2 = _qkv(g, n2, nh, nkv, dk, dv)
        a = cached_attention(alone, StepLayout([0], [n0]), q0, k0, v0, 0, 0.3, -1)
        cat = lambda *ts: torch.cat(ts, dim=2)  # noqa: E731
        b = cached_attention(packed, StepLayout([1, 0, 2], [n1, n0, n2]), cat(q1, q0, q2), cat(k1, k0, k2),
                             cat(v1, v0, v2), 0, 0.3, -1)
        torch.testing.assert_close(b[:, n1:n1 + n0], a, rtol=1e-12, atol=1e-12)


def test_drop_and_readd_starts_fresh():
    g = torch.Generator().manual_seed(6)
    cache = KVCache(1)
    cache.add_sequence(0)
    q, k, v = _qkv(g, 5, 2, 1, 4, 4)
    cached_attention(cache, StepLayout([0], [5]), q, k, v, 0, 0.5, -1)
    cache.drop_sequence(0)
    cache.add_sequence(0)
    q, k, v = _qkv(g, 3, 2, 1, 4, 4)
    got = cached_attention(cache, StepLayout([0], [3]), q, k, v, 0, 0.5, -1)
    want = ref_attention(q[0], k[0], v[0], [0, 1, 2], 0.5, -1)
    torch.testing.assert_close(got[0], want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window", [-1, 3])
def test_sinks_match_transformers_gpt_oss_eager(window):
    """The GPT-OSS sinks path against transformers' own `eager_attention_forward` (modeling_gpt_oss.py) on one
    sequence: a prefill of 5 then 2 decode steps, with the additive mask built from transformers' mask functions."""
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    hf_mask = hf_rule(window)
    g = torch.Generator().manual_seed(7)
    nh, nkv, d = 4, 2, 8
    sinks = torch.randn(nh, generator=g, dtype=F64)
    module = SimpleNamespace(num_key_value_groups=nh // nkv, sinks=sinks, training=False)
    cache = KVCache(1)
    cache.add_sequence(0)
    ks, vs, pos = [], [], 0
    for n in (5, 1, 1):
        q, k, v = _qkv(g, n, nh, nkv, d, d)
        got = cached_attention(cache, StepLayout([0], [n]), q, k, v, 0, d ** -0.5, window, sinks)  # [1, n, nh, d]
        ks.append(k)
        vs.append(v)
        k_all, v_all = torch.cat(ks, dim=2), torch.cat(vs, dim=2)
        s = k_all.shape[2]
        mask = torch.tensor([[0.0 if hf_mask(p, j) else float("-inf") for j in range(s)] for p in range(pos, pos + n)],
                            dtype=F64)[None, None]
        want, _ = eager_attention_forward(module, q, k_all, v_all, mask, scaling=d ** -0.5)  # [1, n, nh, d]
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        pos += n


# --------------------------------------------------------------------- bounded memory (long prompts)
LONG_STEPS = [
    [(0, 40), (1, 9)],  # fresh prefills: 40 tokens (split in query chunks below) and 9
    [(0, 20), (1, 1)],  # a chunk continuing a 40-token prefix, beside a decode
    [(0, 1), (1, 1)],
]


@pytest.mark.parametrize("window,sinks", [(-1, None), (7, None), (-1, True), (7, True)])
def test_query_chunks_bound_every_mask_and_match_the_reference(monkeypatch, window, sinks):
    """With ATTENTION_BYTES forced tiny, every masked attention call covers a few queries (its mask and scores
    under the bound) and the results still equal the float64 reference; plain causal prefill stays one
    unmasked is_causal call, which builds no [n, n] matrix at all."""
    import torch.nn.functional as F

    import msc.runtime.paged_kv as pk

    nh, nkv, dk, dv = 4, 2, 8, 6
    budget = 3000
    monkeypatch.setattr(pk, "ATTENTION_BYTES", budget)
    calls = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append((q.shape[-2], k.shape[-2], None if attn_mask is None else tuple(attn_mask.shape), is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    with_sinks = pk.attention_with_sinks
    sink_calls = []

    def recording_sinks(q, k, v, allowed, scaling, s):
        sink_calls.append(tuple(allowed.shape))
        return with_sinks(q, k, v, allowed, scaling, s)

    monkeypatch.setattr(pk, "attention_with_sinks", recording_sinks)
    sink_t = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=F64) if sinks else None
    for got, want in _run(LONG_STEPS, nh, nkv, dk, dv, window, sinks=sink_t, seed=11):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    masked = [c for c in calls if c[2] is not None]
    if sinks is None:
        assert masked, "the window and continuing-chunk paths call SDPA with a mask"
        for rows, keys, mask, _ in masked:
            assert mask == (rows, keys)
            assert rows == 1 or rows * keys * (nh * 4 * 2 + 5) <= budget, (rows, keys)
        assert max(rows for rows, *_ in masked) < 20  # the 40-query prefill and the 20-query chunk were split
        if window > 0:  # a chunk sees at most its own queries and the window before them
            assert all(keys <= rows + window - 1 for rows, keys, *_ in masked)
        else:  # the fresh prefills: unmasked, causal, whole
            assert (40, 40, None, True) in calls and (9, 9, None, True) in calls
    else:  # the sinks path computes its own scores (3 float32 [heads, rows, keys] tensors), chunked the same way
        assert not calls and max(rows for rows, _ in sink_calls) < 20
        assert all(rows == 1 or rows * keys * (nh * 4 * 3 + 5) <= budget for rows, keys in sink_calls)


def test_query_chunks_cover_the_queries_once():
    import msc.runtime.paged_kv as pk

    for n, heads, keys in [(1, 1, 1), (40, 4, 40), (4096, 32, 4096), (100_000, 64, 100_000)]:
        chunks = pk._query_chunks(n, heads, keys)
        assert chunks[0][0] == 0 and chunks[-1][1] == n
        assert all(a < b and b == c for (a, b), (c, _) in zip(chunks, chunks[1:] + [(n, n)]))
        rows = max(b - a for a, b in chunks)
        assert rows == 1 or rows * keys * (heads * 8 + 5) <= pk.ATTENTION_BYTES
    assert pk._query_chunks(4096, 4, 4096) == [(0, 4096)]  # the tiny default model's sizes: one call, as before


# prefixes of 5 sequences, then one step where 4 of them continue with chunks of different sizes beside a decode
# and a fresh prompt (what prefix caching makes common), then another such step
MANY_CHUNKS = [
    [(0, 9), (1, 3), (2, 14), (3, 6), (4, 5)],
    [(0, 4), (1, 7), (2, 1), (3, 2), (5, 6), (4, 3)],
    [(3, 5), (0, 2), (1, 1), (4, 8), (5, 3)],
]


@pytest.mark.parametrize("window", [-1, 4])
@pytest.mark.parametrize("nh,nkv,dk,dv", [(4, 2, 8, 8), (6, 1, 8, 5)])
def test_many_continuing_chunks_are_one_call_and_match_the_reference(monkeypatch, window, nh, nkv, dk, dv):
    """The chunks that continue a cached prefix in one step are attended together: one masked SDPA call per
    layer for all of them (a [G, 1, Q, S] mask), and every output equals the float64 reference."""
    import torch.nn.functional as F

    calls = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append(None if attn_mask is None else tuple(attn_mask.shape))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    for got, want in _run(MANY_CHUNKS, nh, nkv, dk, dv, window, seed=5, layers=(0, 1)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    batched = [c for c in calls if c is not None and len(c) == 4]
    # steps 2 and 3, two layers each: 4 continuing chunks each (a chunk of 1 beside a prefix is a decode row)
    assert [c[0] for c in batched] == [4, 4, 4, 4]
    assert all(c[1] == 1 for c in batched)


def test_continuing_chunks_split_into_batches_under_the_bound(monkeypatch):
    """With ATTENTION_BYTES small, the chunks go in several batches (each under the bound) and one chunk too
    large for a batch takes the query-chunked path; the outputs still equal the reference."""
    import msc.runtime.paged_kv as pk

    monkeypatch.setattr(pk, "ATTENTION_BYTES", 15_000)
    made = []
    real = pk._chunk_batches

    def recording(*a, **kw):
        batches, alone = real(*a, **kw)
        made.append(([b.q_rows.shape[0] for b in batches], len(alone)))
        return batches, alone

    monkeypatch.setattr(pk, "_chunk_batches", recording)
    steps = MANY_CHUNKS[:1] + [[(0, 4), (1, 7), (3, 2), (4, 3), (2, 40)]]
    for got, want in _run(steps, 4, 2, 8, 8, -1, seed=9):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    (sizes, alone), = made
    assert len(sizes) >= 2 and sum(sizes) + alone == 5 and alone == 1
