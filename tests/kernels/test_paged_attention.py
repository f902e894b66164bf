"""The paged KV cache (msc/runtime/paged_kv.py) and the Triton decode kernel (backends/compute/triton_attention.py).

- the kernel against an independent float64 reference that gathers each sequence's contiguous K/V from
  the pages itself (random, non-contiguous block tables; lengths 1, non-multiples of the page; GQA;
  float32/float16; sliding window; split context), with the output poisoned before the call;
- `paged_attention` (prefill, decode steps, then mixed steps: decode rows through the kernel beside a fresh
  prompt and a chunk continuing a cached prefix) against the float64 reference of tests/test_kv_cache_attention.py;
- the block allocator and the cache's bookkeeping;
- on a GPU only: bf16 at a realistic size, and a decode step replayed from a CUDA graph.

On a machine without CUDA, tests/conftest.py sets TRITON_INTERPRET=1 first, so the kernel runs in Triton's
interpreter at tiny sizes; with CUDA the same tests run natively on the GPU.
"""
from __future__ import annotations

import pytest
import torch

from msc.errors import MscError
from msc.runtime.paged_kv import BlockAllocator, PagedKVCache, StepMeta, paged_attention
from tests.test_kv_cache_attention import Reference, StepLayout

F64 = torch.float64
NH, NKV = 4, 2
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _kernel():
    from msc.backends.compute.triton_attention import paged_decode_attention

    return paged_decode_attention


# ------------------------------------------------------------------------------------------ reference
def ref_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, window=-1, sinks=None):
    """float64: for each sequence, gather its K/V token by token, softmax over the visible keys (and the head's
    sink [nh], a logit with no value, where given)."""
    q, k_cache, v_cache, block_tables, seq_lens = (t.cpu() for t in (q, k_cache, v_cache, block_tables, seq_lens))
    b, nh, _ = q.shape
    page, nkv = k_cache.shape[1], k_cache.shape[2]
    rep = nh // nkv
    out = torch.zeros(b, nh, v_cache.shape[-1], dtype=F64)
    for i in range(b):
        n = int(seq_lens[i])
        toks = [(int(block_tables[i, p // page]), p % page) for p in range(n)]
        keys = torch.stack([k_cache[blk, off] for blk, off in toks]).to(F64)  # [n, nkv, d]
        vals = torch.stack([v_cache[blk, off] for blk, off in toks]).to(F64)  # [n, nkv, dv]
        visible = torch.tensor([window <= 0 or p >= n - window for p in range(n)])
        for h in range(nh):
            logits = (scale * (keys[:, h // rep] @ q[i, h].to(F64))).masked_fill(~visible, float("-inf"))  # [n]
            if sinks is None:
                probs = torch.softmax(logits, dim=0)
            else:
                probs = torch.softmax(torch.cat([logits, sinks[h].cpu().to(F64).reshape(1)]), dim=0)[:-1]
            out[i, h] = probs @ vals[:, h // rep]
    return out


def _random_case(g, lens, page, d, dv, dtype, spare_blocks=5):
    """Random caches and a block table that scatters each sequence over random, non-contiguous blocks."""
    b = len(lens)
    max_blocks = max(-(-n // page) for n in lens) + 1
    num_blocks = b * max_blocks + spare_blocks
    k_cache = torch.randn(num_blocks, page, NKV, d, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, page, NKV, dv, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g)[: b * max_blocks]
    table = perm.reshape(b, max_blocks).to(torch.int32)  # every entry a real block, in random order
    q = torch.randn(b, NH, d, generator=g).to(dtype)
    lens = torch.tensor(lens, dtype=torch.int32)
    return tuple(t.to(DEV) for t in (q, k_cache, v_cache, table, lens))


# --------------------------------------------------------------------------------------------- kernel
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 5e-3)])
@pytest.mark.parametrize("window", [-1, 6])
def test_kernel_matches_reference(dtype, tol, window):
    g = torch.Generator().manual_seed(1)
    lens = [1, 7, 16, 37]
    q, kc, vc, table, seq_lens = _random_case(g, lens, page=4, d=16, dv=32, dtype=dtype)
    out = torch.full((len(lens), NH, 32), float("nan"), dtype=dtype, device=DEV)
    got = _kernel()(q, kc, vc, table, seq_lens, 0.25, window, out=out, tile=16)
    assert got is out and not torch.isnan(out).any(), "some output elements were not written"
    torch.testing.assert_close(out.cpu().to(F64), ref_decode(q, kc, vc, table, seq_lens, 0.25, window), rtol=tol, atol=tol)


@pytest.mark.parametrize("num_splits", [2, 3])
@pytest.mark.parametrize("window", [-1, 9])
def test_kernel_split_context(num_splits, window):
    """Flash-decoding: partials over context ranges (some empty for short sequences) merged exactly."""
    g = torch.Generator().manual_seed(2)
    lens = [1, 19, 40]
    q, kc, vc, table, seq_lens = _random_case(g, lens, page=4, d=32, dv=16, dtype=torch.float32)
    out = torch.full((len(lens), NH, 16), float("nan"), device=DEV)
    _kernel()(q, kc, vc, table, seq_lens, 0.2, window, out=out, num_splits=num_splits, tile=16)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.cpu().to(F64), ref_decode(q, kc, vc, table, seq_lens, 0.2, window), rtol=1e-5, atol=1e-5)


def test_kernel_default_tile_and_empty_rows():
    """The default config; a padding row (seq_len 0) gives zeros, not NaN."""
    g = torch.Generator().manual_seed(3)
    q, kc, vc, table, seq_lens = _random_case(g, [5, 33, 0], page=4, d=16, dv=16, dtype=torch.float32)
    out = _kernel()(q, kc, vc, table, seq_lens, 0.3)
    assert out.shape == (3, NH, 16) and out.dtype == torch.float32
    assert torch.equal(out[2].cpu(), torch.zeros(NH, 16))
    torch.testing.assert_close(out[:2].cpu().to(F64), ref_decode(q[:2], kc, vc, table[:2], seq_lens[:2], 0.3), rtol=1e-5, atol=1e-5)


def test_kernel_rejects_bad_shapes():
    g = torch.Generator().manual_seed(4)
    q, kc, vc, table, seq_lens = _random_case(g, [3], page=4, d=16, dv=16, dtype=torch.float32)
    kernel = _kernel()
    with pytest.raises(MscError, match="power of two"):
        kernel(q[..., :12], kc[..., :12], vc, table, seq_lens, 1.0)
    with pytest.raises(MscError, match="multiple"):
        kernel(q[:, :3], kc, vc, table, seq_lens, 1.0)
    with pytest.raises(MscError, match="int32"):
        kernel(q, kc, vc, table.long(), seq_lens, 1.0)


# ------------------------------------------------------------------------ paged_attention vs reference
def _qkv(g, t, d, dv):
    return (torch.randn(1, NH, t, d, generator=g).to(DEV), torch.randn(1, NKV, t, d, generator=g).to(DEV),
            torch.randn(1, NKV, t, dv, generator=g).to(DEV))


@pytest.mark.parametrize("window", [-1, 5])
def test_paged_attention_matches_the_reference(window):
    """Prefill three sequences (two of equal length: one batched SDPA call), decode steps, then mixed steps
    (decode rows beside a fresh prompt, then beside a chunk that continues it), two layers."""
    g = torch.Generator().manual_seed(5)
    d, dv, layers, scale = 16, 32, 2, 0.25
    seqs, lengths = [10, 11, 12], [6, 9, 6]
    cache = PagedKVCache(layers, num_blocks=40, page_size=4, num_kv_heads=NKV, head_dim=d, v_head_dim=dv,
                         dtype=torch.float32, device=DEV, max_seq_len=32)
    refs = [Reference() for _ in range(layers)]
    ctx = {}
    for s_ in seqs + [13]:
        cache.add_sequence(s_)
        ctx[s_] = 0
    steps = [list(zip(seqs, lengths))] + [[(s_, 1) for s_ in seqs]] * 4
    steps += [[(10, 1), (13, 5), (11, 1), (12, 1)], [(13, 3), (10, 1), (11, 1), (12, 1)]]
    for step in steps:
        ids, counts = [s_ for s_, _ in step], [n for _, n in step]
        meta = StepMeta.for_step(cache, ids, [ctx[s_] for s_ in ids], counts)
        layout = StepLayout(ids, counts)
        for layer in range(layers):
            q, k, v = _qkv(g, sum(counts), d, dv)
            got = paged_attention(cache, layer, q, k, v, meta, scale, window)
            want = refs[layer].step(layout, q.cpu(), k.cpu(), v.cpu(), scale, window)
            assert got.shape == (1, sum(counts), NH, dv)
            torch.testing.assert_close(got[0].cpu().double(), want, rtol=1e-5, atol=1e-5)
        for s_, n in step:
            ctx[s_] += n


def test_static_meta_update_and_padding():
    """A padded static decode meta updated in place gives the same step as a fresh meta; pad rows are 0."""
    g = torch.Generator().manual_seed(6)
    d = 16
    cache = PagedKVCache(1, num_blocks=20, page_size=4, num_kv_heads=NKV, head_dim=d, v_head_dim=d,
                         dtype=torch.float32, device=DEV, max_seq_len=24)
    for s in (0, 1):
        cache.add_sequence(s)
    q, k, v = _qkv(g, 11, d, d)
    paged_attention(cache, 0, q, k, v, StepMeta.for_prefill(cache, [0, 1], [4, 7]), 0.3, -1)

    static = StepMeta.for_decode(cache, [], [], pad_to=3)  # what a CUDA graph would be captured with
    assert static.slots.shape == (3,) and static.block_tables.shape == (3, cache.max_blocks_per_seq)
    fresh = StepMeta.for_decode(cache, [0, 1], [4, 7], pad_to=3)
    assert fresh.copy_into(static) is static and static.seq_lens.tolist() == [5, 8, 0]
    q, k, v = _qkv(g, 3, d, d)
    got = paged_attention(cache, 0, q, k, v, static, 0.3, -1)  # [1, 3, nh, d]
    assert torch.equal(got[0, 2].cpu(), torch.zeros(NH, d))
    want = paged_attention(cache, 0, q[:, :, :2], k[:, :, :2], v[:, :, :2], StepMeta.for_decode(cache, [0, 1], [4, 7]), 0.3, -1)
    torch.testing.assert_close(got[:, :2], want)
    with pytest.raises(MscError, match="pad_to"):
        static.update_(StepMeta.for_decode(cache, [0, 1], [5, 8]))


# ------------------------------------------------------------------------------------- bookkeeping
def test_allocator_out_of_blocks_allocates_nothing():
    alloc = BlockAllocator(5)
    got = alloc.allocate(3)
    assert sorted(got) == [0, 1, 2] and alloc.num_free == 2
    with pytest.raises(MscError, match=r"asked for 3, 2 free of 5"):
        alloc.allocate(3)
    assert alloc.num_free == 2
    alloc.free(got)
    assert alloc.num_free == 5
    with pytest.raises(MscError, match="not allocated"):
        alloc.free([got[0]])


def test_cache_blocks_follow_sequences():
    cache = PagedKVCache(2, num_blocks=6, page_size=4, num_kv_heads=NKV, head_dim=16, v_head_dim=16,
                         dtype=torch.float32, device="cpu", max_seq_len=16)
    assert cache.k.shape == (2, 6, 4, NKV, 16) and cache.v.shape == (2, 6, 4, NKV, 16)
    cache.add_sequence(1)
    cache.add_sequence(2)
    cache.ensure(1, 9)  # 3 blocks
    cache.ensure(2, 4)  # 1 block
    assert cache.allocator.num_free == 2
    with pytest.raises(MscError, match="max_seq_len=16"):
        cache.ensure(1, 17)
    with pytest.raises(MscError, match="out of blocks"):
        cache.ensure(2, 16)  # 3 more blocks, 2 free: nothing taken
    assert cache.allocator.num_free == 2 and len(cache.blocks(2)) == 1
    b1 = cache.blocks(1)
    slots = cache.slots([1, 1, 2], [0, 5, 3])
    assert slots.tolist() == [b1[0] * 4, b1[1] * 4 + 1, cache.blocks(2)[0] * 4 + 3]
    table = cache.block_table([2, 1])
    assert table.dtype == torch.int32 and table.shape == (2, 4)
    assert table.tolist() == [cache.blocks(2) + [0, 0, 0], b1 + [0]]
    with pytest.raises(MscError, match="ensure"):
        cache.slots([2], [4])
    cache.drop_sequence(1)
    assert cache.allocator.num_free == 5
    with pytest.raises(MscError, match="unknown sequence 1"):
        cache.ensure(1, 1)


# ---------------------------------------------------------------------------------------------- GPU
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _rel_err(got, want):
    return float((got.to(F64) - want).norm() / want.norm())


def _ref_dense(q, k_hist, v_hist, lens, scale):
    """float64 on the device: q [B, nh, d], k_hist [B, nkv, S, d] (contiguous histories), lens [B] -> [B, nh, dv]."""
    b, nh, _ = q.shape
    rep = nh // k_hist.shape[1]
    k = k_hist.to(F64).repeat_interleave(rep, dim=1)  # [B, nh, S, d]
    v = v_hist.to(F64).repeat_interleave(rep, dim=1)  # [B, nh, S, dv]
    logits = scale * torch.einsum("bhd,bhsd->bhs", q.to(F64), k)  # [B, nh, S]
    pos = torch.arange(k.shape[2], device=q.device)
    logits = logits.masked_fill(pos[None, None, :] >= lens[:, None, None], float("-inf"))
    return torch.einsum("bhs,bhsd->bhd", torch.softmax(logits, dim=-1), v)


@pytest.mark.gpu
@gpu
def test_gpu_bf16_realistic_and_cuda_graph():
    dev, dt = torch.device("cuda"), torch.bfloat16
    b, nh, nkv, d, page, ctx, steps = 64, 32, 8, 128, 16, 600, 3
    scale = d ** -0.5
    g = torch.Generator(device=dev).manual_seed(0)
    cache = PagedKVCache(1, num_blocks=b * (ctx + 64) // page + 8, page_size=page, num_kv_heads=nkv, head_dim=d,
                         v_head_dim=d, dtype=dt, device=dev, max_seq_len=ctx + 64)
    lens0 = torch.randint(ctx // 2, ctx, (b,), generator=g, device=dev).tolist()
    seqs = list(range(b))
    k_hist = torch.randn(b, nkv, ctx + steps, d, generator=g, device=dev).to(dt)  # [B, nkv, S, d]
    v_hist = torch.randn(b, nkv, ctx + steps, d, generator=g, device=dev).to(dt)
    for s in seqs:  # interleave the sequences' allocations so their blocks are not contiguous
        cache.add_sequence(s)
    for chunk in range(0, ctx, page):
        for s in seqs:
            if chunk < lens0[s]:
                cache.ensure(s, min(chunk + page, lens0[s]))
    for s in seqs:  # write each prefix directly through the cache's own write()
        n = lens0[s]
        cache.write(0, cache.slots([s] * n, range(n)), k_hist[s, :, :n].transpose(0, 1), v_hist[s, :, :n].transpose(0, 1))

    # one eager step: the kernel alone, bf16, against float64
    meta = StepMeta.for_decode(cache, seqs, [n - 1 for n in lens0])  # the last prefix token as the query
    q = torch.randn(b, nh, d, generator=g, device=dev).to(dt)
    from msc.backends.compute.triton_attention import paged_decode_attention

    for splits in (None, 1, 4):
        out = torch.full((b, nh, d), float("nan"), device=dev, dtype=dt)
        paged_decode_attention(q, cache.k[0], cache.v[0], meta.block_tables, meta.seq_lens, scale, out=out, num_splits=splits)
        assert not out.isnan().any()
        assert _rel_err(out, _ref_dense(q, k_hist, v_hist, meta.seq_lens, scale)) < 1e-2

    # a decode step captured once, replayed with the metas updated in place
    static = StepMeta.for_decode(cache, seqs, lens0)
    sq = torch.zeros(1, nh, b, d, device=dev, dtype=dt)
    sk = torch.zeros(1, nkv, b, d, device=dev, dtype=dt)
    sv = torch.zeros(1, nkv, b, d, device=dev, dtype=dt)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles the kernel) outside the graph
        paged_attention(cache, 0, sq, sk, sv, static, scale, -1)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = paged_attention(cache, 0, sq, sk, sv, static, scale, -1)  # [1, B, nh, d]
    for step in range(steps):
        pos = [n + step for n in lens0]
        StepMeta.for_decode(cache, seqs, pos).copy_into(static)
        idx = torch.tensor(pos, device=dev)
        sk.copy_(k_hist[torch.arange(b, device=dev), :, idx].transpose(0, 1)[None])  # [1, nkv, B, d]
        sv.copy_(v_hist[torch.arange(b, device=dev), :, idx].transpose(0, 1)[None])
        sq.copy_(torch.randn(1, nh, b, d, generator=g, device=dev).to(dt))
        graph.replay()
        want = _ref_dense(sq[0].transpose(0, 1), k_hist, v_hist, static.seq_lens, scale)  # [B, nh, d]
        assert _rel_err(static_out[0], want) < 1e-2, f"replay {step}"



@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("window", [-1, 6])
def test_kernel_with_attention_sinks(num_splits, window):
    """GPT-OSS's sinks in the kernel: one logit per head that takes softmax mass and gives no value, in the first
    context split only (the merge then weighs it like any key); a large sink visibly shrinks the output."""
    g = torch.Generator().manual_seed(5)
    lens = [1, 7, 30]
    q, kc, vc, table, seq_lens = _random_case(g, lens, page=4, d=16, dv=16, dtype=torch.float32)
    sinks = torch.tensor([0.5, -1.0, 3.0, 8.0], device=DEV)  # [NH]
    out = torch.full((len(lens), NH, 16), float("nan"), device=DEV)
    _kernel()(q, kc, vc, table, seq_lens, 0.25, window, out=out, num_splits=num_splits, tile=16, sinks=sinks)
    want = ref_decode(q, kc, vc, table, seq_lens, 0.25, window, sinks)
    torch.testing.assert_close(out.cpu().to(F64), want, rtol=1e-5, atol=1e-5)
    plain = ref_decode(q, kc, vc, table, seq_lens, 0.25, window)
    assert (want[:, 3].abs().sum() < 0.1 * plain[:, 3].abs().sum())  # the sink of 8 takes most of head 3's mass
    with pytest.raises(MscError, match="sinks must be"):
        _kernel()(q, kc, vc, table, seq_lens, 0.25, window, sinks=sinks[:2])
