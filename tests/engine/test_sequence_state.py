"""The state layers' runtime (msc.runtime.sequence_state) against transformers' own functions, run on whole
sequences: packed prefill steps, chunked prompts and batched decode steps must give what one call over each
whole sequence gives, and slots must come and go with the sequences."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from msc.errors import MscError
from msc.runtime.paged_kv import PagedKVCache, StepMeta
from msc.runtime.sequence_state import SequenceStates, causal_conv1d, gated_delta_rule, state_key

hf = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")

C, K = 6, 4
HK, HV, DK, DV = 2, 4, 8, 5


def _cache(seqs, max_batch=4):
    cache = PagedKVCache(1, 80, 4, 1, 2, 2, torch.float32, "cpu", 128)
    cache.states = SequenceStates({state_key(0, "conv", 0): ((C, K - 1), torch.float32),
                                   state_key(0, "delta"): ((HV, DK, DV), torch.float32)}, max_batch + 1, "cpu")
    for s in seqs:
        cache.add_sequence(s)
    return cache


def _run_steps(cache, lengths, steps, fn):
    """Feed each sequence's tokens in the given steps: steps is a list of {seq: count}; fn(meta, rows) runs one
    step on the rows (global token indices) and returns its output rows."""
    done = {s: 0 for s in lengths}
    outs = {s: [] for s in lengths}
    for step in steps:
        ids = list(step)
        meta = StepMeta.for_step(cache, ids, [done[s] for s in ids], [step[s] for s in ids])
        rows = [(s, done[s] + i) for s in ids for i in range(step[s])]
        out = fn(meta, rows)
        for (s, _), o in zip(rows, out):
            outs[s].append(o)
        for s in ids:
            done[s] += step[s]
    return {s: torch.stack(o) for s, o in outs.items()}


def test_conv_over_steps_equals_one_causal_convolution():
    g = torch.Generator().manual_seed(0)
    lengths = {0: 9, 1: 5, 2: 7}
    xs = {s: torch.randn(C, n, generator=g) for s, n in lengths.items()}
    w, b = torch.randn(C, K, generator=g), torch.randn(C, generator=g)
    cache = _cache(lengths)
    # a packed prefill of two prompts, a chunked prompt, then mixed and decode steps
    steps = [{0: 4, 1: 3}, {0: 3, 1: 1, 2: 5}, {0: 1, 1: 1, 2: 1}, {0: 1, 2: 1}]

    def step(meta, rows):
        x = torch.stack([xs[s][:, p] for s, p in rows], dim=1).unsqueeze(0)  # [1, C, T]
        return causal_conv1d(cache.states, meta, state_key(0, "conv", 0), x, w, b, "silu")[0].T

    got = _run_steps(cache, lengths, steps, step)
    for s, n in lengths.items():
        want = hf.causal_conv1d_fn(xs[s].unsqueeze(0), w, b, activation="silu")[0].T  # [n, C]
        torch.testing.assert_close(got[s], want)


@pytest.mark.parametrize("prefill", ["chunked", "loop"])
def test_gated_delta_rule_over_steps_equals_transformers_chunked_rule(monkeypatch, prefill):
    """Both prompt paths: transformers' chunked form started from each slot's state (the default for a per-head
    decay) and msc's own token-by-token recurrence (MSC_STATE_PREFILL=loop, what decode steps run)."""
    monkeypatch.setenv("MSC_STATE_PREFILL", prefill)
    g = torch.Generator().manual_seed(1)
    lengths = {0: 70, 1: 6, 2: 3}  # 70: more than one of transformers' 64-token chunks
    q = {s: torch.randn(n, HK, DK, generator=g) for s, n in lengths.items()}
    k = {s: torch.randn(n, HK, DK, generator=g) for s, n in lengths.items()}
    v = {s: torch.randn(n, HV, DV, generator=g) for s, n in lengths.items()}
    gate = {s: -F.softplus(torch.randn(n, HV, generator=g)) for s, n in lengths.items()}
    beta = {s: torch.rand(n, HV, generator=g) for s, n in lengths.items()}
    cache = _cache(lengths)
    steps = [{0: 40, 1: 2}, {0: 28, 1: 3, 2: 2}, {0: 1, 1: 1, 2: 1}, {0: 1}]

    def step(meta, rows):
        pick = lambda d: torch.stack([d[s][p] for s, p in rows]).unsqueeze(0)  # noqa: E731
        return gated_delta_rule(cache.states, meta, state_key(0, "delta"), pick(q), pick(k), pick(v), pick(gate),
                                pick(beta), True)[0]

    got = _run_steps(cache, lengths, steps, step)
    for s in lengths:
        want, _ = hf.torch_chunk_gated_delta_rule(q[s][None], k[s][None], v[s][None], gate[s][None], beta[s][None],
                                                  use_qk_l2norm_in_kernel=True)
        torch.testing.assert_close(got[s], want[0], rtol=1e-4, atol=1e-4)


def test_slots_are_zeroed_for_a_new_sequence_and_limited():
    cache = _cache([0, 1], max_batch=2)
    key = state_key(0, "delta")
    cache.states.buffer(key)[cache.states.slot(0)].fill_(3.0)
    cache.drop_sequence(0)
    cache.add_sequence(5)  # takes the freed slot: zeroed
    assert cache.states.slot(5) != cache.states.scratch
    assert float(cache.states.buffer(key)[cache.states.slot(5)].abs().sum()) == 0.0
    with pytest.raises(MscError, match="state slots are taken"):
        cache.add_sequence(6)


def test_padded_decode_rows_use_the_scratch_slot():
    cache = _cache([0])
    meta = StepMeta.for_decode(cache, [0], [0], pad_to=4)
    assert meta.state_slots.tolist() == [cache.states.slot(0)] + [cache.states.scratch] * 3
    static = StepMeta.static(cache, 4)
    static.update_(meta)
    assert static.state_slots.tolist() == meta.state_slots.tolist()


def _mamba_cache(shape, max_batch=4, seqs=(0, 1, 2)):
    cache = PagedKVCache(1, 80, 4, 1, 2, 2, torch.float32, "cpu", 128)
    cache.states = SequenceStates({state_key(0, "ssm"): (shape, torch.float32)}, max_batch + 1, "cpu")
    for s in seqs:
        cache.add_sequence(s)
    return cache


@pytest.mark.parametrize("prefill", ["auto", "loop"])  # auto: transformers' chunked SSD from each slot's state
def test_mamba2_scan_over_steps_equals_transformers_chunked_scan(monkeypatch, prefill):
    monkeypatch.setenv("MSC_STATE_PREFILL", prefill)
    from transformers.models.nemotron_h import modeling_nemotron_h as nh

    from msc.runtime.sequence_state import mamba2_scan

    g = torch.Generator().manual_seed(2)
    heads, groups, p, n, chunk = 4, 2, 3, 5, 8
    lengths = {0: 21, 1: 6, 2: 3}  # 21: three of transformers' 8-token chunks
    x = {s: torch.randn(t, heads * p, generator=g) for s, t in lengths.items()}
    b = {s: torch.randn(t, groups * n, generator=g) for s, t in lengths.items()}
    c = {s: torch.randn(t, groups * n, generator=g) for s, t in lengths.items()}
    dt = {s: torch.randn(t, heads, generator=g) for s, t in lengths.items()}
    a_log, d, dt_bias = torch.rand(heads, generator=g), torch.randn(heads, generator=g), torch.randn(heads, generator=g)
    cache = _mamba_cache((heads, p, n))
    steps = [{0: 10, 1: 2}, {0: 11, 1: 4, 2: 2}, {2: 1}]

    def step(meta, rows):
        pick = lambda t: torch.stack([t[s][i] for s, i in rows]).unsqueeze(0)  # noqa: E731
        return mamba2_scan(cache.states, meta, state_key(0, "ssm"), pick(x), pick(b), pick(c), pick(dt), a_log, d,
                           dt_bias, heads, groups, 0.0, float("inf"))[0]

    got = _run_steps(cache, lengths, steps, step)
    for s, t in lengths.items():
        want = nh.mamba2_chunk_scan(x[s].view(1, t, heads, p), dt[s][None], -torch.exp(a_log), b[s].view(1, t, groups, n),
                                    c[s].view(1, t, groups, n), chunk_size=chunk, D=d, dt_bias=dt_bias, dt_softplus=True)
        torch.testing.assert_close(got[s], want.reshape(t, heads * p), rtol=1e-4, atol=1e-4)


def test_mamba_scan_over_steps_equals_transformers_selective_scan():
    from transformers.models.jamba import modeling_jamba as jm

    from msc.runtime.sequence_state import mamba_scan

    g = torch.Generator().manual_seed(4)
    inner, n = 6, 4
    lengths = {0: 9, 1: 5, 2: 2}
    x = {s: torch.randn(inner, t, generator=g) for s, t in lengths.items()}
    dt = {s: torch.randn(inner, t, generator=g) for s, t in lengths.items()}
    gate = {s: torch.randn(inner, t, generator=g) for s, t in lengths.items()}
    b = {s: torch.randn(t, n, generator=g) for s, t in lengths.items()}
    c = {s: torch.randn(t, n, generator=g) for s, t in lengths.items()}
    a_log, d, dt_bias = torch.rand(inner, n, generator=g), torch.randn(inner, generator=g), torch.randn(inner, generator=g)
    cache = _mamba_cache((inner, n))
    steps = [{0: 4, 1: 3}, {0: 5, 1: 1, 2: 2}, {1: 1}]

    def step(meta, rows):
        cols = lambda t: torch.stack([t[s][:, i] for s, i in rows], dim=1).unsqueeze(0)  # noqa: E731  [1, I, T]
        seq = lambda t: torch.stack([t[s][i] for s, i in rows]).unsqueeze(0)  # noqa: E731  [1, T, N]
        return mamba_scan(cache.states, meta, state_key(0, "ssm"), cols(x), cols(dt), seq(b), seq(c), cols(gate),
                          a_log, d, dt_bias)[0].T

    got = _run_steps(cache, lengths, steps, step)
    for s, t in lengths.items():
        want = jm.mamba_selective_scan(x[s][None], dt[s][None], -torch.exp(a_log), b[s].T[None], c[s].T[None], D=d,
                                       z=gate[s][None], delta_bias=dt_bias, delta_softplus=True)
        torch.testing.assert_close(got[s], want[0].T, rtol=1e-4, atol=1e-4)


def test_chunked_prompts_equal_the_recurrence_with_a_per_channel_decay(monkeypatch):
    """Kimi's per-key-channel decay: prompt steps through transformers' chunked KDA from the slot's state
    (MSC_STATE_PREFILL=chunked; auto keeps the recurrence there, faster on a CPU) give what msc's recurrence gives
    (an independent computation, token by token), chunk boundaries and carried state included; float32."""
    g = torch.Generator().manual_seed(7)
    lengths = {0: 90, 1: 33}
    hk = HV  # KDA: as many key heads as value heads
    q = {s: torch.randn(n, hk, DK, generator=g) for s, n in lengths.items()}
    k = {s: torch.randn(n, hk, DK, generator=g) for s, n in lengths.items()}
    v = {s: torch.randn(n, HV, DV, generator=g) for s, n in lengths.items()}
    gate = {s: -F.softplus(torch.randn(n, HV, DK, generator=g)) for s, n in lengths.items()}
    beta = {s: torch.rand(n, HV, generator=g) for s, n in lengths.items()}
    steps = [{0: 70, 1: 20}, {0: 20, 1: 13}]  # the second step starts from the states the first left
    got = {}
    for prefill in ("chunked", "loop"):
        monkeypatch.setenv("MSC_STATE_PREFILL", prefill)
        cache = _cache(lengths)

        def step(meta, rows):
            pick = lambda d: torch.stack([d[s][p] for s, p in rows]).unsqueeze(0)  # noqa: E731
            return gated_delta_rule(cache.states, meta, state_key(0, "delta"), pick(q), pick(k), pick(v), pick(gate),
                                    pick(beta), True)[0]

        got[prefill] = (_run_steps(cache, lengths, steps, step), cache.states.buffer(state_key(0, "delta")).clone())
    for s in lengths:
        torch.testing.assert_close(got["chunked"][0][s], got["loop"][0][s], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["chunked"][1], got["loop"][1], rtol=1e-4, atol=1e-4)  # the states left behind


def test_chunked_lightning_attention_equals_the_recurrence(monkeypatch):
    """MiniMax's lightning attention (msc::linear_attention): prompt steps in 64-token chunks of matrix products
    give what the token-by-token recurrence gives (an independent computation), over steps that carry each
    sequence's state, chunk boundaries, strong and weak decays included; float32."""
    from msc.runtime.sequence_state import linear_attention

    g = torch.Generator().manual_seed(11)
    h, dk, dv = 4, 8, 6
    lengths = {0: 150, 1: 37, 2: 5}
    q, k, v = ({s: torch.randn(n, h, d, generator=g) for s, n in lengths.items()} for d in (dk, dk, dv))
    log_decay = torch.tensor([-0.01, -0.3, -2.0, -8.0])  # per head
    steps = [{0: 100, 1: 30}, {0: 50, 1: 7, 2: 5}]  # prompts in two steps: the second starts from carried states
    got = {}
    for prefill in ("auto", "loop"):
        monkeypatch.setenv("MSC_STATE_PREFILL", prefill)
        cache = PagedKVCache(1, 80, 4, 1, 2, 2, torch.float32, "cpu", 256)
        cache.states = SequenceStates({state_key(0, "lin"): ((h, dk, dv), torch.float32)}, 4, "cpu")
        for s in lengths:
            cache.add_sequence(s)

        def step(meta, rows):
            pick = lambda d: torch.stack([d[s][p] for s, p in rows]).unsqueeze(0)  # noqa: E731
            return linear_attention(cache.states, meta, state_key(0, "lin"), pick(q), pick(k), pick(v), log_decay)[0]

        got[prefill] = (_run_steps(cache, lengths, steps, step), cache.states.buffer(state_key(0, "lin")).clone())
    for s in lengths:
        torch.testing.assert_close(got["auto"][0][s], got["loop"][0][s], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["auto"][1], got["loop"][1], rtol=1e-4, atol=1e-4)
