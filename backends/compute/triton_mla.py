"""Triton decode attention for multi-head latent attention (MLA) over a paged latent cache.

Layout (msc.runtime.paged_kv, a cache with v_in_k): one shared "head" per token of width r + dr, the
normalised latent (r values) then the rotary key (dr values): cache [num_blocks, page, 1, r + dr]. The
query has absorbed W_k already (msc.runtime.paged_kv.paged_mla_attention): q [B, nh, r + dr] is
(q_nope·W_k, q_rot) per head, so a score is q[:r]·latent + q[r:]·k_rot and the value is the latent
itself. The output [B, nh, r] is the attention-weighted latent; the caller applies W_v.

Design: one program per (sequence, block of HEADS query heads), optionally times context splits. Each
tile of TILE tokens loads the latent once [TILE, r] and uses it twice: transposed for the scores and as
the values (MLA's point: the cache read serves both). Online softmax in float32, as in
backends/compute/triton_attention.py, whose split merge this reuses. Widths that are not powers of two
(small test models) are padded and masked.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from msc.backends.compute.triton_attention import (_M_INIT, _NO_WINDOW, _context_range, _merge_splits_kernel,
                                                  auto_num_splits)
from msc.errors import MscError

# NOTE: launch configuration (HEADS query heads a program, TILE tokens a step), from one H100 run of
# benchmarks/mla_decode.py (docs/results/mla_decode_h100.json; DeepSeek-V3 widths, bf16): with 16 heads a
# GPU (tp 8) 16 x 32 x 4 warps was best at batch 64-256 (85 % of the copy bandwidth at batch 256, context
# 4096); with 128 heads (tp 1) every head block re-reads the latent and 64 x 16 x 8 warps was best, at only
# 15-17 % (a kernel that keeps all heads of a sequence in one program is issue 21's work). Not yet on an H200.
MLA_HEADS = 16
MLA_TILE = 32
MLA_NUM_WARPS = 4
MLA_NUM_STAGES = 2
MLA_MANY_HEADS = (64, 16, 8)  # heads x tile x warps once a GPU holds 64 query heads or more


@triton.jit
def _mla_decode_kernel(
    q_ptr, c_ptr, bt_ptr, lens_ptr, out_ptr, m_ptr, l_ptr,
    scale, window,
    stride_qb, stride_qh, stride_cb, stride_cp, stride_btb, stride_ob, stride_oh,
    NH: tl.constexpr, HEADS: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr, DR: tl.constexpr,
    DR_PAD: tl.constexpr, PAGE: tl.constexpr, TILE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    UPCAST: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    b = tl.program_id(0)
    hb = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(lens_ptr + b)
    lo, begin, end = _context_range(seq_len, window, split, TILE, NUM_SPLITS)

    heads = hb * HEADS + tl.arange(0, HEADS)  # [HEADS]
    row_ok = heads < NH
    offs_r = tl.arange(0, R_PAD)
    r_ok = offs_r < R
    offs_e = tl.arange(0, DR_PAD)
    e_ok = offs_e < DR
    q_row = q_ptr + b * stride_qb + heads[:, None] * stride_qh
    q_lat = tl.load(q_row + offs_r[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)  # [HEADS, R_PAD]
    q_rot = tl.load(q_row + R + offs_e[None, :], mask=row_ok[:, None] & e_ok[None, :], other=0.0)  # [HEADS, DR_PAD]
    if UPCAST:
        q_lat = q_lat.to(tl.float32)
        q_rot = q_rot.to(tl.float32)

    m_i = tl.zeros([HEADS], dtype=tl.float32) + _M_INIT
    l_i = tl.zeros([HEADS], dtype=tl.float32)
    acc = tl.zeros([HEADS, R_PAD], dtype=tl.float32)
    bt_row = bt_ptr + b * stride_btb
    for start in range(begin, end, TILE):
        pos = start + tl.arange(0, TILE)  # [TILE]
        in_seq = pos < seq_len
        valid = in_seq & (pos >= lo)
        block = tl.load(bt_row + pos // PAGE, mask=in_seq, other=0).to(tl.int64)  # [TILE]
        tok = block * stride_cb + (pos % PAGE) * stride_cp  # [TILE]
        lat = tl.load(c_ptr + tok[:, None] + offs_r[None, :], mask=valid[:, None] & r_ok[None, :], other=0.0)  # [TILE, R_PAD]
        rot_t = tl.load(c_ptr + tok[None, :] + R + offs_e[:, None], mask=valid[None, :] & e_ok[:, None],
                        other=0.0)  # [DR_PAD, TILE]
        if UPCAST:
            lat = lat.to(tl.float32)
            rot_t = rot_t.to(tl.float32)
        if IEEE_DOT:
            s = tl.dot(q_lat, tl.trans(lat), input_precision="ieee") + tl.dot(q_rot, rot_t, input_precision="ieee")
        else:
            s = tl.dot(q_lat, tl.trans(lat)) + tl.dot(q_rot, rot_t)  # [HEADS, TILE]
        s = tl.where(valid[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # [HEADS]
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])  # [HEADS, TILE]
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE_DOT:
            pv = tl.dot(p.to(lat.dtype), lat, input_precision="ieee")  # [HEADS, R_PAD]
        else:
            pv = tl.dot(p.to(lat.dtype), lat)  # [HEADS, R_PAD]
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if NUM_SPLITS == 1:
        l_safe = tl.where(l_i > 0, l_i, 1.0)  # seq_len 0 (a padding row): output 0, not NaN
        o = acc / l_safe[:, None]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_r[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & r_ok[None, :])
    else:
        # partials [B, NH, NUM_SPLITS, R_PAD] (acc) and [B, NH, NUM_SPLITS] (m, l), contiguous float32
        part = (b * NH + heads) * NUM_SPLITS + split  # [HEADS]
        tl.store(out_ptr + part[:, None] * R_PAD + offs_r[None, :], acc, mask=row_ok[:, None])
        tl.store(m_ptr + part, m_i, mask=row_ok)
        tl.store(l_ptr + part, l_i, mask=row_ok)


def paged_mla_decode(
    q: Tensor, cache: Tensor, block_tables: Tensor, seq_lens: Tensor, rank: int, scale: float,
    sliding_window: int = -1, *, num_splits: int | None = None, heads: int | None = None, tile: int | None = None,
    num_warps: int | None = None, num_stages: int = MLA_NUM_STAGES,
) -> Tensor:
    """Latent attention of one new query per sequence over its paged context.

    q [B, nh, r + dr] (W_k absorbed); cache [num_blocks, page, 1, r + dr] (latent, then rotary key);
    block_tables int32 [B, max_blocks]; seq_lens int32 [B] (the new token's pair already written);
    rank = r. Returns [B, nh, r] in q's dtype: the attention-weighted latent. No host synchronisation."""
    if q.dim() != 3 or cache.dim() != 4 or cache.shape[2] != 1 or cache.shape[3] != q.shape[2]:
        raise MscError(f"paged_mla_decode: expected q [B, nh, r + dr] and cache [blocks, page, 1, r + dr]; got q "
                       f"{tuple(q.shape)}, cache {tuple(cache.shape)}")
    b, nh, width = q.shape
    default = MLA_MANY_HEADS if nh >= MLA_MANY_HEADS[0] else (MLA_HEADS, MLA_TILE, MLA_NUM_WARPS)
    heads, tile, num_warps = heads or default[0], tile or default[1], num_warps or default[2]
    if not 0 < rank < width:
        raise MscError(f"paged_mla_decode: latent rank {rank} must lie inside the cached width {width}")
    if q.dtype != cache.dtype or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise MscError(f"paged_mla_decode: q {q.dtype} and cache {cache.dtype}; expected one of float32, float16, bfloat16")
    if block_tables.dtype != torch.int32 or tuple(seq_lens.shape) != (b,) or seq_lens.dtype != torch.int32:
        raise MscError(f"paged_mla_decode: block_tables must be int32 [{b}, max_blocks] and seq_lens int32 [{b}]")
    dr = width - rank
    out_rank = triton.next_power_of_2(max(rank, 16))
    out = q.new_empty(b, nh, out_rank)  # [B, nh, R_PAD]; sliced to r below
    if b == 0:
        return out[..., :rank]
    q = q if q.stride(-1) == 1 else q.contiguous()
    cache = cache if cache.stride(-1) == 1 else cache.contiguous()
    block_tables = block_tables.contiguous()
    seq_lens = seq_lens.contiguous()
    page = cache.shape[1]
    head_blocks = triton.cdiv(nh, heads)
    splits = num_splits or auto_num_splits(b, head_blocks, block_tables.shape[1] * page, tile, q.device)
    window = sliding_window if sliding_window > 0 else _NO_WINDOW
    flags = dict(NH=nh, HEADS=heads, R=rank, R_PAD=out_rank, DR=dr, DR_PAD=triton.next_power_of_2(max(dr, 16)),
                 PAGE=page, TILE=tile, NUM_SPLITS=splits, UPCAST=os.environ.get("TRITON_INTERPRET") == "1",
                 IEEE_DOT=q.dtype == torch.float32)
    strides = (q.stride(0), q.stride(1), cache.stride(0), cache.stride(1), block_tables.stride(0))
    if splits == 1:
        _mla_decode_kernel[(b, head_blocks, 1)](
            q, cache, block_tables, seq_lens, out, out, out, float(scale), window, *strides,
            out.stride(0), out.stride(1), **flags, num_warps=num_warps, num_stages=num_stages)
        return out[..., :rank]
    acc = torch.empty(b, nh, splits, out_rank, device=q.device, dtype=torch.float32)  # [B, nh, S, R_PAD]
    m = torch.empty(b, nh, splits, device=q.device, dtype=torch.float32)  # [B, nh, S]
    l = torch.empty(b, nh, splits, device=q.device, dtype=torch.float32)  # [B, nh, S]
    _mla_decode_kernel[(b, head_blocks, splits)](
        q, cache, block_tables, seq_lens, acc, m, l, float(scale), window, *strides,
        0, 0, **flags, num_warps=num_warps, num_stages=num_stages)
    _merge_splits_kernel[(b, nh)](
        acc, m, l, out, out.stride(0), out.stride(1),
        NUM_SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits), DV=out_rank, num_warps=4)
    return out[..., :rank]
