"""MLA's latent KV cache (msc.runtime.paged_kv.paged_mla_attention) and its Triton decode kernel
(backends/compute/triton_mla.py), against an independent float64 reference that expands every head's keys
and values from the latent (what transformers' DeepseekV3Attention.expand_kv computes) and attends per
sequence; plus the cache's bytes (the latent only, values a view of it) and the planner's equal count.

On a machine without CUDA, tests/conftest.py sets TRITON_INTERPRET=1, so the kernel runs in Triton's
interpreter; with CUDA the same tests run on the GPU.
"""
from __future__ import annotations

import pytest
import torch

from msc.errors import MscError
from msc.runtime.paged_kv import PagedKVCache, StepMeta, paged_mla_attention

F64 = torch.float64
NH, R, DR, DN, DV = 4, 24, 8, 8, 12  # widths that are not powers of two, as in the tiny DeepSeek-V3 config
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def expanded_reference(q, latents, k_rots, kv_b, positions_of_queries, scale, window=-1):
    """float64 MLA of one sequence: q [n, nh, dn + dr] at the given positions; latents [S, r], k_rots [S, dr]
    of every position 0..S-1. Keys of head h: cat(latent·W_k[h]ᵀ, k_rot); values latent·W_v[h]ᵀ."""
    w = kv_b.to(F64).reshape(-1, DN + DV, R)
    w = w.repeat_interleave(NH // w.shape[0], dim=0)  # grouped: query head h reads key/value head h // group
    k_nope = torch.einsum("sr,hdr->hsd", latents.to(F64), w[:, :DN])  # [nh, S, dn]
    v = torch.einsum("sr,hdr->hsd", latents.to(F64), w[:, DN:])  # [nh, S, dv]
    k = torch.cat([k_nope, k_rots.to(F64)[None].expand(NH, -1, -1)], dim=-1)  # [nh, S, dn + dr]
    out = []
    for i, p in enumerate(positions_of_queries):
        keys = torch.arange(k.shape[1])
        ok = (keys <= p) & ((keys > p - window) if window > 0 else True)
        logits = torch.einsum("hd,hsd->hs", q[i].to(F64), k) * scale  # [nh, S]
        probs = torch.softmax(logits.masked_fill(~ok[None], float("-inf")), dim=-1)
        out.append(torch.einsum("hs,hsd->hd", probs, v))  # [nh, dv]
    return torch.stack(out)  # [n, nh, dv]


def _cache(dtype=torch.float32, blocks=40, page=4, max_seq_len=64):
    return PagedKVCache(1, blocks, page, 1, R + DR, R, dtype, DEV, max_seq_len, v_in_k=True)


def _step(cache, layer_inputs, meta, kv_b, scale, window=-1):
    q, lat, rot = layer_inputs  # [T, nh, dn + dr], [T, r], [T, dr]
    out = paged_mla_attention(cache, 0, q.permute(1, 0, 2).unsqueeze(0), lat[None, None], rot[None, None], kv_b,
                              meta, scale, window, DN, DV)  # [1, T, nh, dv]
    return out[0]  # [T, nh, dv]


@pytest.mark.parametrize("dtype,window,path,kv_heads", [
    (torch.float32, -1, "kernel", NH), (torch.float32, 5, "kernel", NH), (torch.float16, -1, "kernel", NH),
    (torch.float32, 5, "gathered", NH), (torch.float32, -1, "kernel", 2)])  # 2: grouped (GLM-4-MoE-Lite's kind)
def test_prefill_then_decode_then_mixed_equal_the_expanded_reference(dtype, window, path, kv_heads, monkeypatch):
    if path == "gathered":  # a CPU run outside the tests: no Triton interpreter, each sequence's pages gathered
        if DEV.type == "cuda":
            pytest.skip("the gathered decode path is the CPU's")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    g = torch.Generator().manual_seed(0)
    scale = (DN + DR) ** -0.5
    kv_b = (torch.randn(kv_heads * (DN + DV), R, generator=g) * 0.3).to(dtype).to(DEV)
    lens = [5, 9, 1]
    total = {s: [] for s in range(3)}  # every (q, latent, rot) a sequence has had, in order

    def fresh(n):
        return (torch.randn(n, NH, DN + DR, generator=g).to(dtype), torch.randn(n, R, generator=g).to(dtype),
                torch.randn(n, DR, generator=g).to(dtype))

    def check(out, seqs, counts):
        start = 0
        tol = 2e-5 if dtype == torch.float32 else 3e-3
        for s, n in zip(seqs, counts):
            qs = torch.cat([t[0] for t in total[s]])
            lat = torch.cat([t[1] for t in total[s]])
            rot = torch.cat([t[2] for t in total[s]])
            pos = list(range(lat.shape[0] - n, lat.shape[0]))
            ref = expanded_reference(qs[-n:], lat, rot, kv_b.cpu(), pos, scale, window)
            got = out[start:start + n].cpu().to(F64)
            assert (got - ref).abs().max().item() < tol * max(1.0, ref.abs().max().item()), (s, n)
            start += n

    cache = _cache(dtype)
    for s in range(3):
        cache.add_sequence(s)

    def run(seqs, contexts, counts):
        parts = [fresh(n) for n in counts]
        for s, p in zip(seqs, parts):
            total[s].append(p)
        q, lat, rot = (torch.cat([p[i] for p in parts]).to(DEV) for i in range(3))
        meta = StepMeta.for_step(cache, seqs, contexts, counts)
        out = _step(cache, (q, lat, rot), meta, kv_b, scale, window)
        check(out, seqs, counts)

    run([0, 1, 2], [0, 0, 0], lens)  # fresh prompts: the expanded prefill path
    ctx = list(lens)
    for _ in range(3):  # decode: the kernel (or the gathered path on a CPU run without the interpreter)
        run([0, 1, 2], ctx, [1, 1, 1])
        ctx = [c + 1 for c in ctx]
    run([0, 1, 2], ctx, [1, 4, 1])  # mixed: decode rows beside a chunk continuing a cached prefix


def test_the_kernel_with_split_context_and_padding_rows():
    from msc.backends.compute.triton_mla import paged_mla_decode

    g = torch.Generator().manual_seed(1)
    page, lens = 4, [13, 1, 0, 7]  # a padding row (length 0) gives zeros
    blocks = 30
    cache = torch.randn(blocks, page, 1, R + DR, generator=g).to(DEV)
    perm = torch.randperm(blocks, generator=g)
    table = torch.zeros(len(lens), 5, dtype=torch.int32)
    for i in range(len(lens)):
        table[i] = perm[i * 5:(i + 1) * 5].to(torch.int32)
    q = torch.randn(len(lens), NH, R + DR, generator=g).to(DEV)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    for splits in (1, 3):
        out = paged_mla_decode(q, cache, table.to(DEV), seq_lens.to(DEV), R, 0.2, num_splits=splits).cpu()
        for i, n in enumerate(lens):
            if n == 0:
                assert out[i].abs().max().item() == 0.0
                continue
            toks = torch.stack([cache[table[i, p // page], p % page, 0].cpu() for p in range(n)]).to(F64)  # [n, r + dr]
            probs = torch.softmax(0.2 * q[i].cpu().to(F64) @ toks.T, dim=-1)  # [nh, n]
            ref = probs @ toks[:, :R]  # [nh, r]
            assert (out[i].to(F64) - ref).abs().max().item() < 1e-5, (splits, i)


def test_the_latent_cache_holds_no_separate_values():
    cache = _cache(torch.bfloat16, blocks=8)
    assert cache.v.data_ptr() == cache.k.data_ptr() and cache.v.shape[-1] == R  # the latent, read in place
    assert cache.k.untyped_storage().nbytes() == 8 * 4 * (R + DR) * 2  # blocks x page x (r + dr) x bf16
    with pytest.raises(MscError, match="not a latent cache"):
        plain = PagedKVCache(1, 8, 4, 1, R + DR, R, torch.float32, DEV, 16)
        plain.add_sequence(0)
        meta = StepMeta.for_step(plain, [0], [0], [1])
        paged_mla_attention(plain, 0, torch.zeros(1, NH, 1, DN + DR), torch.zeros(1, 1, 1, R), torch.zeros(1, 1, 1, DR),
                            torch.zeros(NH * (DN + DV), R), meta, 1.0, -1, DN, DV)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("nh,batch,ctx", [(16, 8, 300), (128, 3, 1000)])
def test_deepseek_v3_widths_in_bf16_on_the_gpu(nh, batch, ctx):
    """r 512 + dr 64, bf16, the heads of tp 8 and tp 1: within bf16 tolerance of a float32 computation, with and
    without split context, and replayed from a CUDA graph."""
    from msc.backends.compute.triton_mla import paged_mla_decode

    g = torch.Generator().manual_seed(2)
    r, dr, page = 512, 64, 16
    per = -(-ctx // page)
    cache = (torch.randn(batch * per + 4, page, 1, r + dr, generator=g) * 0.5).to(torch.bfloat16).cuda()
    table = torch.randperm(batch * per + 4, generator=g)[: batch * per].reshape(batch, per).to(torch.int32).cuda()
    lens = torch.tensor([ctx - 7 * i for i in range(batch)], dtype=torch.int32).cuda()
    q = (torch.randn(batch, nh, r + dr, generator=g) * 0.5).to(torch.bfloat16).cuda()
    toks = cache[table.long()].reshape(batch, -1, r + dr).float()  # [B, S, r + dr]
    visible = torch.arange(toks.shape[1], device="cuda")[None] < lens[:, None].long()  # [B, S]
    logits = torch.einsum("bhd,bsd->bhs", q.float(), toks) * 0.1
    probs = torch.softmax(logits.masked_fill(~visible[:, None], float("-inf")), dim=-1)
    ref = torch.einsum("bhs,bsr->bhr", probs, toks[..., :r])  # [B, nh, r]
    for splits in (None, 4):
        out = paged_mla_decode(q, cache, table, lens, r, 0.1, num_splits=splits)
        assert (out.float() - ref).abs().max().item() < 2e-2
    static = torch.empty(batch, nh, r, dtype=torch.bfloat16, device="cuda")
    paged_mla_decode(q, cache, table, lens, r, 0.1)  # compiled before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static.copy_(paged_mla_decode(q, cache, table, lens, r, 0.1))
    static.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert (static.float() - ref).abs().max().item() < 2e-2
