"""Triton decode attention over a paged KV cache (one new query token per sequence).

Layout (msc.runtime.paged_kv): the cache of one layer is a pool of fixed-size pages,
k_cache [num_blocks, page, nkv, d] and v_cache [num_blocks, page, nkv, dv]; sequence b's token at position
p lives at block_tables[b, p // page], offset p % page.

Design: one program per (sequence, kv head), optionally times a number of context splits. A program
loads its head's whole group of query heads (GQA: nh / nkv rows, padded to at least 16 rows so tl.dot can
run on tensor cores; the padding rows are masked out and never stored) and walks the context in tiles of
TILE tokens, gathering each token's address from the block table, with an online softmax in float32.
Every K/V byte of a (sequence, kv head) is thus read once for all its query heads: decode attention is
memory-bound, and bandwidth is what this kernel is about.

Split-context ("flash-decoding"): with few sequences, B * nkv programs leave most SMs idle; then each
(sequence, kv head) is cut into NUM_SPLITS contiguous ranges of tiles, each program writes an unnormalised
partial (acc, running max m, running sum l) in float32, and a second small kernel merges the partials.
The number of splits depends only on shapes (never on seq_lens' values), so the call stays capturable in
a CUDA graph.

Under TRITON_INTERPRET=1 (CPU tests) tl.dot on bfloat16 operands is wrong, so the wrapper sets the UPCAST
flag there and the kernel computes in float32 throughout; on a GPU it runs tl.dot on the native dtype.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from msc.errors import MscError

# NOTE: launch configuration, kept here as constants to be tuned on the H200 (benchmarks/decode_attention.py
# --tune tries variants). TILE is the number of context tokens per inner-loop step; it need not be a
# multiple of the page size since every token's address is gathered on its own (page sizes that divide
# TILE just make the gathers coalesce better). MIN_GROUP_ROWS is tl.dot's smallest M.
# Measured once on an H200 (torch 2.11, triton 3.6; Mixtral-8x7B layer nh 32 / nkv 8 / d 128, bf16, page 16,
# ctx 730; copy bandwidth 4.27 TB/s): TILE 64 / 4 warps was best or within noise of it at B=64 (~63 us,
# ~3.0 TB/s) and B=256 (~206-211 us, ~3.7 TB/s); 8 warps and splitting the context were slower at both sizes.
DECODE_TILE = 64
DECODE_NUM_WARPS = 4
DECODE_NUM_STAGES = 2
MIN_GROUP_ROWS = 16
# NOTE: split-context heuristic: split only when B * nkv programs would fill fewer than SPLIT_TARGET_WAVES
# waves of the SMs, never into more than MAX_SPLITS parts, and keep at least MIN_TILES_PER_SPLIT tiles
# (of the block table's capacity) per part.
SPLIT_TARGET_WAVES = 2
MAX_SPLITS = 16
MIN_TILES_PER_SPLIT = 2
_NO_WINDOW = 1 << 30  # a window larger than any context: sliding_window <= 0 means none
_M_INIT = tl.constexpr(-1.0e30)  # finite "minus infinity" for running maxima: empty ranges give no inf - inf


@triton.jit
def _context_range(seq_len, window, split, TILE: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """(lo, begin, end): the first key the window lets the query see, and the positions [begin, end) this
    context split walks (whole TILE-aligned tiles from lo's, cut into NUM_SPLITS runs)."""
    lo = tl.maximum(seq_len - window, 0)
    tile_lo = (lo // TILE) * TILE
    n_tiles = (seq_len - tile_lo + TILE - 1) // TILE
    tiles_per_split = (n_tiles + NUM_SPLITS - 1) // NUM_SPLITS
    begin = tile_lo + split * tiles_per_split * TILE
    end = tl.minimum(begin + tiles_per_split * TILE, seq_len)
    return lo, begin, end


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr, m_ptr, l_ptr, sinks_ptr,
    scale, window,
    stride_qb, stride_qh,
    stride_kb, stride_kp, stride_kh,
    stride_vb, stride_vp, stride_vh,
    stride_btb,
    stride_ob, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    PAGE: tl.constexpr, TILE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    UPCAST: tl.constexpr, IEEE_DOT: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(lens_ptr + b)
    lo, begin, end = _context_range(seq_len, window, split, TILE, NUM_SPLITS)

    rows = tl.arange(0, GROUP_PAD)  # query heads of this kv head's group, padded
    row_ok = rows < GROUP
    heads = kvh * GROUP + rows  # [GROUP_PAD]
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)  # [GROUP_PAD, D]
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.zeros([GROUP_PAD], dtype=tl.float32) + _M_INIT
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    if HAS_SINKS:
        # NOTE: a sink (GPT-OSS) is one more logit per head with no value: the first split starts its running
        # softmax from it (max = the sink, mass exp(0) = 1), so every split and the merge treat it as a key
        sink = tl.load(sinks_ptr + heads, mask=row_ok, other=0.0).to(tl.float32)  # [GROUP_PAD]
        first = split == 0
        m_i = tl.where(first, sink, m_i)
        l_i = tl.where(first, 1.0, l_i)
    acc = tl.zeros([GROUP_PAD, DV], dtype=tl.float32)
    bt_row = bt_ptr + b * stride_btb
    for start in range(begin, end, TILE):
        pos = start + tl.arange(0, TILE)  # [TILE]
        in_seq = pos < seq_len
        valid = in_seq & (pos >= lo)
        block = tl.load(bt_row + pos // PAGE, mask=in_seq, other=0).to(tl.int64)  # [TILE]
        off = pos % PAGE
        k_tok = block * stride_kb + off * stride_kp + kvh * stride_kh  # [TILE]
        v_tok = block * stride_vb + off * stride_vp + kvh * stride_vh  # [TILE]
        k_t = tl.load(k_ptr + k_tok[None, :] + offs_d[:, None], mask=valid[None, :], other=0.0)  # [D, TILE]
        v = tl.load(v_ptr + v_tok[:, None] + offs_dv[None, :], mask=valid[:, None], other=0.0)  # [TILE, DV]
        if UPCAST:
            k_t = k_t.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE_DOT:
            s = tl.dot(q, k_t, input_precision="ieee")  # [GROUP_PAD, TILE]
        else:
            s = tl.dot(q, k_t)  # [GROUP_PAD, TILE]
        s = tl.where(valid[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # [GROUP_PAD]
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])  # [GROUP_PAD, TILE]
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE_DOT:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")  # [GROUP_PAD, DV]
        else:
            pv = tl.dot(p.to(v.dtype), v)  # [GROUP_PAD, DV]
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if NUM_SPLITS == 1:
        # NOTE: seq_len 0 (a padding row of a CUDA-graph batch) has l == 0: its output is 0, not NaN.
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        o = acc / l_safe[:, None]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_dv[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        # partials [B, nh, NUM_SPLITS, DV] (acc) and [B, nh, NUM_SPLITS] (m, l), contiguous float32
        part = (b * (GROUP * tl.num_programs(1)) + heads) * NUM_SPLITS + split  # [GROUP_PAD]
        tl.store(out_ptr + part[:, None] * DV + offs_dv[None, :], acc, mask=row_ok[:, None])
        tl.store(m_ptr + part, m_i, mask=row_ok)
        tl.store(l_ptr + part, l_i, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    acc_ptr, m_ptr, l_ptr, out_ptr, stride_ob, stride_oh,
    NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, DV: tl.constexpr,
):
    """One program per (sequence, query head): rescale the split partials to a common max and normalise."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    nh = tl.num_programs(1)
    base = (b * nh + h) * NUM_SPLITS
    offs_s = tl.arange(0, SPLITS_PAD)
    ok = offs_s < NUM_SPLITS
    offs_dv = tl.arange(0, DV)
    m = tl.load(m_ptr + base + offs_s, mask=ok, other=_M_INIT)  # [SPLITS_PAD]
    l = tl.load(l_ptr + base + offs_s, mask=ok, other=0.0)  # [SPLITS_PAD]
    acc = tl.load(acc_ptr + (base + offs_s[:, None]) * DV + offs_dv[None, :], mask=ok[:, None], other=0.0)  # [SPLITS_PAD, DV]
    w = tl.exp(m - tl.max(m, 0))  # [SPLITS_PAD]; empty splits have l == 0 and acc == 0
    total = tl.sum(w * l, 0)
    total = tl.where(total > 0, total, 1.0)
    o = tl.sum(acc * w[:, None], 0) / total  # [DV]
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_dv, o.to(out_ptr.dtype.element_ty))


# ------------------------------------------------------------------------------------------------ wrapper
def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def _check_inputs(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.dim() != 4:
        raise MscError(f"paged_decode_attention: expected q [B, nh, d], k_cache [blocks, page, nkv, d], v_cache "
                       f"[blocks, page, nkv, dv]; got q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, "
                       f"v_cache {tuple(v_cache.shape)}")
    b, nh, d = q.shape
    nblk, page, nkv, dk = k_cache.shape
    dv = v_cache.shape[-1]
    if dk != d or tuple(v_cache.shape[:3]) != (nblk, page, nkv):
        raise MscError(f"paged_decode_attention: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} "
                       f"do not fit q {tuple(q.shape)} (expected k_cache [.., .., nkv, {d}], v_cache [{nblk}, {page}, {nkv}, dv])")
    if nh % nkv != 0:
        raise MscError(f"paged_decode_attention: {nh} query heads is not a multiple of {nkv} kv heads")
    for name, n in (("d", d), ("dv", dv)):
        if not _is_pow2(n) or n < 16:
            raise MscError(f"paged_decode_attention: head dim {name}={n} is not supported; expected a power of two >= 16")
    if q.dtype != k_cache.dtype or q.dtype != v_cache.dtype:
        raise MscError(f"paged_decode_attention: q {q.dtype}, k_cache {k_cache.dtype}, v_cache {v_cache.dtype}: expected one dtype")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise MscError(f"paged_decode_attention: dtype {q.dtype} is not supported; expected float32, float16 or bfloat16")
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.shape[0] != b:
        raise MscError(f"paged_decode_attention: block_tables must be int32 [{b}, max_blocks]; got "
                       f"{block_tables.dtype} {tuple(block_tables.shape)}")
    if seq_lens.dtype != torch.int32 or tuple(seq_lens.shape) != (b,):
        raise MscError(f"paged_decode_attention: seq_lens must be int32 [{b}]; got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    devices = {t.device for t in (q, k_cache, v_cache, block_tables, seq_lens)}
    if len(devices) != 1:
        raise MscError(f"paged_decode_attention: inputs are on several devices {sorted(map(str, devices))}; expected one")


def auto_num_splits(batch: int, num_kv_heads: int, max_context: int, tile: int, device: torch.device) -> int:
    """Splits of the context per (sequence, kv head), from shapes only (so CUDA-graph safe): 1 unless the
    B * nkv programs would fill fewer than SPLIT_TARGET_WAVES waves of the GPU's SMs."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = batch * num_kv_heads
    want = triton.cdiv(SPLIT_TARGET_WAVES * sms, max(programs, 1))
    most = max(1, triton.cdiv(max_context, tile) // MIN_TILES_PER_SPLIT)
    return max(1, min(want, MAX_SPLITS, most))


def paged_decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor, scale: float,
    sliding_window: int = -1, out: Tensor | None = None, *, num_splits: int | None = None,
    tile: int = DECODE_TILE, num_warps: int = DECODE_NUM_WARPS, num_stages: int = DECODE_NUM_STAGES,
    sinks: Tensor | None = None,
) -> Tensor:
    """Attention of one new query token per sequence over its paged context.

    q [B, nh, d]; k_cache [num_blocks, page, nkv, d]; v_cache [num_blocks, page, nkv, dv];
    block_tables int32 [B, max_blocks]; seq_lens int32 [B] (context length including the new token, whose
    K/V must already be in the cache). Returns [B, nh, dv] in q's dtype (into `out` when given).
    sliding_window > 0: the query (at position seq_len - 1) sees keys at positions >= seq_len - window.
    num_splits: context splits per (sequence, kv head); None picks one from the shapes (auto_num_splits).
    sinks [nh] (GPT-OSS): one extra logit per head that joins the softmax and carries no value.
    No host synchronisation: capturable in a CUDA graph.
    """
    _check_inputs(q, k_cache, v_cache, block_tables, seq_lens)
    b, nh, d = q.shape
    if sinks is not None:
        if tuple(sinks.shape) != (nh,) or sinks.device != q.device:
            raise MscError(f"paged_decode_attention: sinks must be [{nh}] on {q.device}; got {tuple(sinks.shape)} on "
                           f"{sinks.device}")
        sinks = sinks.to(torch.float32).contiguous()
    _, page, nkv, _ = k_cache.shape
    dv = v_cache.shape[-1]
    if not _is_pow2(tile) or tile < 16:
        raise MscError(f"paged_decode_attention: tile={tile} is not supported; expected a power of two >= 16")
    if out is None:
        out = q.new_empty(b, nh, dv)  # [B, nh, dv]
    elif tuple(out.shape) != (b, nh, dv) or out.dtype != q.dtype or out.stride(-1) != 1:
        raise MscError(f"paged_decode_attention: out must be {q.dtype} [{b}, {nh}, {dv}] with unit last stride; "
                       f"got {out.dtype} {tuple(out.shape)}")
    if b == 0:
        return out
    # the kernel assumes unit stride along the head dim and inside a page row (true for cache views)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_cache = k_cache if k_cache.stride(-1) == 1 else k_cache.contiguous()
    v_cache = v_cache if v_cache.stride(-1) == 1 else v_cache.contiguous()
    block_tables = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
    seq_lens = seq_lens.contiguous()

    group = nh // nkv
    splits = num_splits or auto_num_splits(b, nkv, block_tables.shape[1] * page, tile, q.device)
    window = sliding_window if sliding_window > 0 else _NO_WINDOW
    flags = dict(
        GROUP=group, GROUP_PAD=max(MIN_GROUP_ROWS, triton.next_power_of_2(group)), D=d, DV=dv, PAGE=page,
        TILE=tile, NUM_SPLITS=splits,
        UPCAST=os.environ.get("TRITON_INTERPRET") == "1", IEEE_DOT=q.dtype == torch.float32,
        HAS_SINKS=sinks is not None,
    )
    sinks_arg = sinks if sinks is not None else seq_lens  # (not read without sinks)
    strides = (q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
               v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0))
    if splits == 1:
        _paged_decode_kernel[(b, nkv, 1)](
            q, k_cache, v_cache, block_tables, seq_lens, out, out, out, sinks_arg, float(scale), window, *strides,
            out.stride(0), out.stride(1), **flags, num_warps=num_warps, num_stages=num_stages)
        return out
    acc = torch.empty(b, nh, splits, dv, device=q.device, dtype=torch.float32)  # [B, nh, S, dv]
    m = torch.empty(b, nh, splits, device=q.device, dtype=torch.float32)  # [B, nh, S]
    l = torch.empty(b, nh, splits, device=q.device, dtype=torch.float32)  # [B, nh, S]
    _paged_decode_kernel[(b, nkv, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, acc, m, l, sinks_arg, float(scale), window, *strides,
        0, 0, **flags, num_warps=num_warps, num_stages=num_stages)
    _merge_splits_kernel[(b, nh)](
        acc, m, l, out, out.stride(0), out.stride(1),
        NUM_SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits), DV=dv, num_warps=4)
    return out
