"""Fused MoE experts in Triton: tokens grouped by expert, gate/up projection + activation, down projection
and top-k weighting, in two kernels.

    hidden [T, H], top_k_index / top_k_weights [T, K], gate_up [E, 2I, H] (gate rows then up rows),
    down [E, H, I]  ->  out [T, H]

1. `moe_align` sorts the T·K (token, expert) assignments by expert and pads each expert's run to a multiple
   of BLOCK_M, so that every BLOCK_M-row tile of the sorted list belongs to one expert. It uses torch ops of
   static shape only (no host sync), so a decode step that calls it can be captured in a CUDA graph.
2. `_gate_up_act_kernel`: per tile, gather the tokens' rows of `hidden`, multiply by the expert's gate and up
   rows (two accumulators, so the activation is applied in registers), write h [P, I] in sorted order.
3. `_down_kernel`: per tile, h @ down[e]^T scaled by each assignment's routing weight, written to the
   assignment's own row of out_k [T·K, H]; out = out_k summed over K.

Assignments whose expert lies outside this weight slice [first_expert, first_expert + E) contribute zero,
like the eager reference (`torch_eager.gated_experts`), so partial sums over expert nodes add up.

Tile sizes come from a per-GPU table stored as data (moe_configs/<gpu>.json, written by
benchmarks/moe_kernel.py --tune); a GPU without one tunes each token bucket on first use, cached on disk
(moe_tune.py); the size heuristic is the fallback.
"""
from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from msc.errors import MscError

# activations the kernel applies in registers (others run through the eager reference)
ACTIVATIONS = {"silu": 0, "swish": 0, "gelu_pytorch_tanh": 1, "gelu_new": 1, "gelu_fast": 1, "relu": 2}
CONFIG_DIR = Path(__file__).with_name("moe_configs")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ---------------------------------------------------------------------------------------------- align
class Alignment(NamedTuple):
    """Assignments sorted by local expert, each expert's run padded to a multiple of BLOCK_M.

    sorted_ids [P] int32: assignment id t·K + k per slot, A = T·K for padding; token_of [P] int32: its token
    (0 for padding); block_expert [P / BLOCK_M] int32: each tile's local expert (E for tiles past the end);
    tiles_used [1] int32: tiles in use. P = round_up(A + E·(BLOCK_M - 1), BLOCK_M) is a static upper bound,
    so no shape depends on the routing (a decode step that aligns can be captured in a CUDA graph).
    """
    sorted_ids: Tensor
    token_of: Tensor
    block_expert: Tensor
    tiles_used: Tensor


def padded_slots(num_assign: int, num_experts: int, block_m: int) -> int:
    return -(-(num_assign + num_experts * (block_m - 1)) // block_m) * block_m


def moe_align_torch(top_k_index: Tensor, first_expert: int, num_experts: int, block_m: int) -> Alignment:
    """The alignment in plain torch ops (the reference the Triton version is tested against)."""
    device = top_k_index.device
    top_k = top_k_index.shape[-1] if top_k_index.dim() else 1
    a = top_k_index.numel()
    e_max = num_experts
    p = padded_slots(a, e_max, block_m)
    local = top_k_index.reshape(-1) - first_expert  # [A]
    expert = torch.where((local >= 0) & (local < e_max), local, torch.full_like(local, e_max))  # [A], e_max = not here
    counts = torch.zeros(e_max + 1, dtype=torch.int64, device=device).scatter_add_(0, expert, torch.ones_like(expert))
    padded = (counts[:e_max] + block_m - 1) // block_m * block_m  # [E]
    padded_end = torch.cumsum(padded, 0)  # [E]
    padded_start = padded_end - padded  # [E]
    plain_start = torch.cumsum(counts, 0) - counts  # [E + 1]
    order = torch.argsort(expert, stable=True)  # [A] assignment ids grouped by expert
    e_sorted = expert[order]  # [A]
    rank = torch.arange(a, device=device) - plain_start[e_sorted]  # [A] position within its expert's run
    # NOTE: assignments of other nodes' experts go to a dump slot (index P) that is cut off, so no
    # boolean indexing (a data-dependent shape and a host sync) is needed.
    dest = torch.where(e_sorted < e_max, padded_start[e_sorted.clamp(max=e_max - 1)] + rank, torch.full_like(rank, p))
    sorted_ids = torch.full((p + 1,), a, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    sorted_ids = sorted_ids[:p]
    token_of = torch.where(sorted_ids < a, sorted_ids // top_k, torch.zeros_like(sorted_ids))
    tile_start = torch.arange(0, p, block_m, device=device)  # [P / block_m]
    block_expert = torch.searchsorted(padded_end, tile_start, right=True).to(torch.int32)  # [P / block_m]
    tiles_used = (padded_end[-1:] // block_m).to(torch.int32) if e_max else torch.zeros(1, dtype=torch.int32, device=device)
    return Alignment(sorted_ids, token_of, block_expert, tiles_used)


@triton.jit
def _onehot(idx_ptr, chunk, num_assign, first_expert, num_experts, BLOCK: tl.constexpr, E_PAD: tl.constexpr):
    """This chunk's assignments: ids [BLOCK], and onehot [BLOCK, E_PAD] of their local expert (0 rows for
    assignments of other nodes' experts and past the end)."""
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    inside = offs < num_assign
    local = tl.load(idx_ptr + offs, mask=inside, other=-1).to(tl.int32) - first_expert
    mine = inside & (local >= 0) & (local < num_experts)
    onehot = (local[:, None] == tl.arange(0, E_PAD)[None, :]) & mine[:, None]
    return offs, onehot.to(tl.int32)


@triton.jit
def _align_count_kernel(idx_ptr, chunk_counts_ptr, num_assign, first_expert, num_experts,
                        BLOCK: tl.constexpr, E_PAD: tl.constexpr):
    chunk = tl.program_id(0)
    _, onehot = _onehot(idx_ptr, chunk, num_assign, first_expert, num_experts, BLOCK, E_PAD)
    tl.store(chunk_counts_ptr + chunk * E_PAD + tl.arange(0, E_PAD), tl.sum(onehot, axis=0))


@triton.jit
def _align_offsets_kernel(chunk_counts_ptr, chunk_base_ptr, sorted_ids_ptr, token_of_ptr, block_expert_ptr, tiles_used_ptr,
                          num_chunks, num_assign, num_experts, num_slots,
                          BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, FILL: tl.constexpr, TILES: tl.constexpr):
    """One program: each chunk's first slot per expert, the padded runs, the tiles' experts; padding fill."""
    bins = tl.arange(0, E_PAD)
    counts = tl.zeros((E_PAD,), dtype=tl.int32)
    for c in range(num_chunks):  # chunk_base[c] = assignments of each expert in the chunks before c
        tl.store(chunk_base_ptr + c * E_PAD + bins, counts)
        counts += tl.load(chunk_counts_ptr + c * E_PAD + bins)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # [E_PAD]
    padded_end = tl.cumsum(padded, axis=0)
    padded_start = padded_end - padded
    for c in range(num_chunks):  # + where each expert's run starts
        tl.store(chunk_base_ptr + c * E_PAD + bins, tl.load(chunk_base_ptr + c * E_PAD + bins) + padded_start)
    tl.store(tiles_used_ptr, tl.sum(padded, axis=0) // BLOCK_M)
    for s0 in range(0, num_slots, FILL):
        slots = s0 + tl.arange(0, FILL)
        tl.store(sorted_ids_ptr + slots, tl.full((FILL,), 0, tl.int32) + num_assign, mask=slots < num_slots)
        tl.store(token_of_ptr + slots, tl.zeros((FILL,), tl.int32), mask=slots < num_slots)
    for t0 in range(0, num_slots // BLOCK_M, TILES):
        tiles = t0 + tl.arange(0, TILES)
        before = tl.sum((padded_end[None, :] <= (tiles * BLOCK_M)[:, None]).to(tl.int32), axis=1)  # experts ended
        tl.store(block_expert_ptr + tiles, tl.minimum(before, num_experts), mask=tiles < num_slots // BLOCK_M)


@triton.jit
def _align_scatter_kernel(idx_ptr, chunk_base_ptr, sorted_ids_ptr, token_of_ptr, num_assign, first_expert, num_experts,
                          top_k, BLOCK: tl.constexpr, E_PAD: tl.constexpr):
    chunk = tl.program_id(0)
    offs, onehot = _onehot(idx_ptr, chunk, num_assign, first_expert, num_experts, BLOCK, E_PAD)
    before = tl.cumsum(onehot, axis=0) - onehot  # [BLOCK, E_PAD] same-expert assignments earlier in the chunk
    base = tl.load(chunk_base_ptr + chunk * E_PAD + tl.arange(0, E_PAD))  # [E_PAD]
    dest = tl.sum(onehot * (before + base[None, :]), axis=1)  # [BLOCK] slot of each assignment
    mine = tl.sum(onehot, axis=1) > 0
    tl.store(sorted_ids_ptr + dest, offs.to(tl.int32), mask=mine)
    tl.store(token_of_ptr + dest, (offs // top_k).to(tl.int32), mask=mine)


def moe_align(top_k_index: Tensor, first_expert: int, num_experts: int, block_m: int) -> Alignment:
    """The alignment in three small Triton kernels (count per chunk, offsets, scatter).

    NOTE: the torch version takes ~30 launches, which at decode sizes cost more host time than the experts'
    GPU time when the layer runs eagerly (the role processes do); this takes three and one allocation. The
    order within an expert's run is the assignments' order, as in the stable sort of the torch version."""
    a = top_k_index.numel()
    p = padded_slots(a, num_experts, block_m)
    e_pad = max(2, triton.next_power_of_2(num_experts))
    block = max(16, min(256, 8192 // e_pad))
    chunks = max(1, triton.cdiv(a, block))
    tiles = p // block_m
    work = torch.empty(2 * chunks * e_pad + 2 * p + tiles + 1, dtype=torch.int32, device=top_k_index.device)
    chunk_counts, chunk_base = work[:chunks * e_pad], work[chunks * e_pad:2 * chunks * e_pad]
    rest = work[2 * chunks * e_pad:]
    sorted_ids, token_of, block_expert, tiles_used = rest[:p], rest[p:2 * p], rest[2 * p:2 * p + tiles], rest[2 * p + tiles:]
    idx = top_k_index.reshape(-1)
    _align_count_kernel[(chunks,)](idx, chunk_counts, a, first_expert, num_experts, BLOCK=block, E_PAD=e_pad)
    _align_offsets_kernel[(1,)](chunk_counts, chunk_base, sorted_ids, token_of, block_expert, tiles_used,
                                chunks, a, num_experts, p, BLOCK_M=block_m, E_PAD=e_pad, FILL=1024, TILES=block)
    _align_scatter_kernel[(chunks,)](idx, chunk_base, sorted_ids, token_of, a, first_expert, num_experts,
                                     max(1, top_k_index.shape[-1]), BLOCK=block, E_PAD=e_pad)
    return Alignment(sorted_ids, token_of, block_expert, tiles_used)


# ---------------------------------------------------------------------------------------------- kernels
@triton.jit
def _activate(gate, up, ACT: tl.constexpr):
    if ACT == 0:  # silu(gate) * up
        return gate * tl.sigmoid(gate) * up
    elif ACT == 1:  # gelu, tanh approximation: tanh(y) = 2·sigmoid(2y) - 1
        y = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        return 0.5 * gate * (2.0 * tl.sigmoid(2.0 * y)) * up
    else:  # relu
        return tl.maximum(gate, 0.0) * up


@triton.jit
def _tile_of(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Program id -> (m tile, n tile), GROUP_M m tiles at a time across all n tiles.
    NOTE: with many tokens (prefill) the gathered rows of `hidden` do not fit in L2; walking a group of m
    tiles across the n tiles reuses them from L2 instead of re-reading them once per n tile."""
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % size_m, (pid % per_group) // size_m


@triton.jit
def _gate_up_act_kernel(
    x_ptr, w_ptr, h_ptr, sorted_ids_ptr, block_expert_ptr,
    num_assign, top_k, num_experts, inter, hidden,
    stride_xt, stride_we, stride_wn, stride_hp,
    num_m_tiles,
    ACT: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_of(tl.program_id(0), num_m_tiles, tl.cdiv(inter, BLOCK_N), GROUP_M)
    e = tl.load(block_expert_ptr + pid_m)
    if e >= num_experts:  # a tile past the end of the sorted list
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ids = tl.load(sorted_ids_ptr + offs_m)  # [BM] assignment ids (num_assign = padding)
    row_ok = ids < num_assign
    tok = tl.where(row_ok, ids // top_k, 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < inter
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :]  # [BM, BK]
    wg_ptrs = w_ptr + e.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]  # [BK, BN] gate rows
    wu_ptrs = wg_ptrs + inter * stride_wn  # up rows
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_ok = offs_k < hidden - k0
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wg = tl.load(wg_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        wu = tl.load(wu_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            x, wg, wu = x.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
        acc_g = tl.dot(x, wg, acc_g)
        acc_u = tl.dot(x, wu, acc_u)
        x_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K
        wu_ptrs += BLOCK_K
    h = _activate(acc_g, acc_u, ACT)
    h_ptrs = h_ptr + offs_m[:, None] * stride_hp + offs_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(
    h_ptr, w_ptr, out_ptr, sorted_ids_ptr, block_expert_ptr, weights_ptr,
    num_assign, num_experts, hidden, inter,
    stride_hp, stride_we, stride_wn, stride_ot,
    num_m_tiles,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_of(tl.program_id(0), num_m_tiles, tl.cdiv(hidden, BLOCK_N), GROUP_M)
    e = tl.load(block_expert_ptr + pid_m)
    if e >= num_experts:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ids = tl.load(sorted_ids_ptr + offs_m)  # [BM]
    row_ok = ids < num_assign
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + offs_m[:, None] * stride_hp + offs_k[None, :]  # [BM, BK]
    w_ptrs = w_ptr + e.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]  # [BK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        k_ok = offs_k < inter - k0
        h = tl.load(h_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            h, w = h.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(h, w, acc)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    route_w = tl.load(weights_ptr + ids, mask=row_ok, other=0.0).to(tl.float32)  # [BM]
    acc = acc * route_w[:, None]
    out_ptrs = out_ptr + ids[:, None].to(tl.int64) * stride_ot + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# ---------------------------------------------------------------------------------------------- TMA kernels
# NOTE: the Hopper path. The rows of `hidden` are gathered into sorted order first (xs [P, H], one extra pass
# over P·H bytes, small next to the GEMMs), so that every operand tile is a dense box that the tensor memory
# accelerator (TMA) copies into shared memory: no per-row address arithmetic, no masks (TMA pads out-of-range
# boxes with zeros). With PERSISTENT the grid is one program per SM looping over the tiles in use (read from
# the device, so no host sync); otherwise one program per tile of the static upper bound, as above.
@triton.jit
def _tma_tile(tile, num_m, num_n, block_expert_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """A persistent program's tile number -> (its expert, first row, first column)."""
    pid_m, pid_n = _tile_of(tile, num_m, num_n, GROUP_M)
    return tl.load(block_expert_ptr + pid_m), pid_m * BLOCK_M, pid_n * BLOCK_N


@triton.jit
def _gate_up_tma_kernel(
    x_desc, w_desc, h_desc, block_expert_ptr, tiles_used_ptr, inter, hidden, num_progs,
    ACT: tl.constexpr, UPCAST: tl.constexpr, FLATTEN: tl.constexpr, OUT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    num_m = tl.load(tiles_used_ptr)
    num_n = tl.cdiv(inter, BLOCK_N)
    k_steps = tl.cdiv(hidden, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_m * num_n, num_progs, flatten=FLATTEN):
        e, m0, n0 = _tma_tile(tile, num_m, num_n, block_expert_ptr, BLOCK_M, BLOCK_N, GROUP_M)
        w_row = e * 2 * inter + n0  # gate rows of expert e in the [E·2I, H] view; up rows start `inter` later
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_steps):
            k0 = ki * BLOCK_K
            x = x_desc.load([m0, k0])  # [BM, BK]
            wg = w_desc.load([w_row, k0])  # [BN, BK]
            wu = w_desc.load([w_row + inter, k0])  # [BN, BK]
            if UPCAST:
                x, wg, wu = x.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
            acc_g = tl.dot(x, wg.T, acc_g)
            acc_u = tl.dot(x, wu.T, acc_u)
        h = _activate(acc_g, acc_u, ACT)
        h_desc.store([m0, n0], h.to(OUT_DTYPE))  # columns past `inter` are clipped by the descriptor


@triton.jit
def _down_tma_kernel(
    h_desc, w_desc, out_ptr, sorted_ids_ptr, block_expert_ptr, weights_ptr, tiles_used_ptr,
    num_assign, hidden, inter, stride_ot, num_progs,
    UPCAST: tl.constexpr, FLATTEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    num_m = tl.load(tiles_used_ptr)
    num_n = tl.cdiv(hidden, BLOCK_N)
    k_steps = tl.cdiv(inter, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_m * num_n, num_progs, flatten=FLATTEN):
        e, m0, n0 = _tma_tile(tile, num_m, num_n, block_expert_ptr, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_steps):
            k0 = ki * BLOCK_K
            h = h_desc.load([m0, k0])  # [BM, BK]
            w = w_desc.load([e * hidden + n0, k0])  # [BN, BK] rows of expert e in the [E·H, I] view
            if UPCAST:
                h, w = h.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(h, w.T, acc)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        ids = tl.load(sorted_ids_ptr + offs_m)  # [BM]
        row_ok = ids < num_assign
        offs_n = n0 + tl.arange(0, BLOCK_N)
        route_w = tl.load(weights_ptr + ids, mask=row_ok, other=0.0).to(tl.float32)  # [BM]
        acc = acc * route_w[:, None]
        out_ptrs = out_ptr + ids[:, None].to(tl.int64) * stride_ot + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n < hidden)[None, :])


# ---------------------------------------------------------------------------------------------- configs
def _gpu_key() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    return re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name()).strip("_")


@functools.lru_cache(maxsize=8)
def load_config_table(gpu: str) -> dict[int, dict]:
    """{tokens: {"BLOCK_M", "gate_up": {...}, "down": {...}}} from moe_configs/<gpu>.json; {} when absent."""
    path = CONFIG_DIR / f"{gpu}.json"
    if not path.exists():
        return {}
    raw = json.loads(path.read_text())
    return {int(t): cfg for t, cfg in raw["configs"].items()}


def default_config(tokens: int, top_k: int, num_experts: int) -> dict:
    """A size heuristic: small tiles while each expert sees few rows (decode is weight-bandwidth bound)."""
    rows = tokens * top_k / max(num_experts, 1)  # rows per expert on average
    if rows <= 16:
        bm, gu, dn = 16, dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4), dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
    elif rows <= 64:
        bm, gu, dn = 32, dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4), dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
    elif rows <= 256:
        bm, gu, dn = 64, dict(BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4), dict(BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4)
    else:
        bm, gu, dn = 128, dict(BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3), dict(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
    return {"BLOCK_M": bm, "gate_up": gu, "down": dn}


# NOTE: tables and the heuristic are sized for 2-byte dtypes (bf16 / fp16); 4-byte inputs need twice the
# shared memory per stage, so they take small tiles (float32 is for checks, not speed).
SMALL_CONFIG = {"BLOCK_M": 16, "gate_up": dict(BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2),
                "down": dict(BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2)}


def pick_config(tokens: int, top_k: int, num_experts: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """The tuned entry for the nearest token count at or above `tokens` (else the largest), or the heuristic."""
    if _interpreting():
        return {"BLOCK_M": 16, "gate_up": dict(BLOCK_N=16, BLOCK_K=16), "down": dict(BLOCK_N=16, BLOCK_K=16)}
    if dtype.itemsize > 2:
        return SMALL_CONFIG
    table = load_config_table(_gpu_key())
    if not table:
        return default_config(tokens, top_k, num_experts)
    keys = sorted(table)
    key = next((k for k in keys if k >= tokens), keys[-1])
    return table[key]


def _config_for(tokens: int, top_k: int, hidden: Tensor, gate_up: Tensor, down: Tensor) -> dict:
    """pick_config where this GPU has a tile table (or the call is not a bf16/fp16 GPU one); else the entry
    tuned on first use for this layer shape (moe_tune.py), or the heuristic where none can be tuned now."""
    e = gate_up.shape[0]
    if _interpreting() or hidden.dtype.itemsize > 2 or not hidden.is_cuda or load_config_table(_gpu_key()):
        return pick_config(tokens, top_k, e, hidden.dtype)
    from msc.backends.compute.moe_tune import first_use_config

    return first_use_config(tokens, top_k, hidden, gate_up, down, _gpu_key()) or default_config(tokens, top_k, e)


# ---------------------------------------------------------------------------------------------- entry point
@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def tma_possible(hidden: Tensor, gate_up: Tensor, down: Tensor) -> bool:
    """TMA boxes need 16-byte aligned bases and row strides, and Triton's tensor descriptors."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401  (Triton >= 3.4)
    except ImportError:
        return False
    if not (_interpreting() or (hidden.is_cuda and torch.cuda.get_device_capability(hidden.device)[0] >= 9)):
        return False
    row_bytes = (hidden.shape[1] * hidden.element_size(), down.shape[2] * hidden.element_size())  # H and I rows
    return (hidden.dtype in _TL_DTYPES and all(x.data_ptr() % 16 == 0 for x in (hidden, gate_up, down))
            and all(b % 16 == 0 for b in row_bytes))


def supported(act: str, layout: str, gate_up_bias, down_bias) -> bool:
    """Whether the fused kernel covers this experts call (else the eager reference runs it)."""
    return act in ACTIVATIONS and not layout and gate_up_bias is None and down_bias is None


def fused_moe(hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor, gate_up: Tensor, down: Tensor,
              first_expert: int = 0, act: str = "silu", config: dict | None = None) -> Tensor:
    """out [T, H] = sum_k w[t, k] · down[e](act(gate[e] x_t) * up[e] x_t) over the local experts e = idx[t, k]."""
    if act not in ACTIVATIONS:
        raise MscError(f"fused_moe: activation '{act}' is not in the kernel (supported: {sorted(ACTIVATIONS)})")
    t, hdim = hidden.shape
    e, two_i, hdim_w = gate_up.shape
    inter = two_i // 2
    if hdim_w != hdim or down.shape != (e, hdim, inter) or two_i % 2:
        raise MscError(f"fused_moe: weights gate_up {tuple(gate_up.shape)} / down {tuple(down.shape)} do not match "
                       f"hidden size {hdim}: expected [E, 2I, {hdim}] and [E, {hdim}, I]")
    k = top_k_index.shape[1]
    if t == 0:
        return hidden.new_zeros(0, hdim)
    hidden, gate_up, down = hidden.contiguous(), gate_up.contiguous(), down.contiguous()
    cfg = config or _config_for(t, k, hidden, gate_up, down)
    if cfg.get("tma") and tma_possible(hidden, gate_up, down):
        return _fused_moe_tma(hidden, top_k_index, top_k_weights, gate_up, down, first_expert, act, cfg)
    bm = cfg["BLOCK_M"]
    sorted_ids, _, block_expert, _ = moe_align(top_k_index, first_expert, e, bm)
    p = sorted_ids.numel()
    weights = top_k_weights.reshape(-1).contiguous()  # [T·K]
    h = torch.empty(p, inter, dtype=hidden.dtype, device=hidden.device)  # [P, I] in sorted order
    out_k = torch.zeros(t * k, hdim, dtype=hidden.dtype, device=hidden.device)  # [T·K, H]
    upcast = _interpreting()
    gu, dn = _launch_args(cfg["gate_up"]), _launch_args(cfg["down"])
    m_tiles, group_m = p // bm, cfg.get("GROUP_M", 8)
    _gate_up_act_kernel[(m_tiles * triton.cdiv(inter, gu["BLOCK_N"]),)](
        hidden, gate_up, h, sorted_ids, block_expert, t * k, k, e, inter, hdim,
        hidden.stride(0), gate_up.stride(0), gate_up.stride(1), h.stride(0), m_tiles,
        ACT=ACTIVATIONS[act], UPCAST=upcast, BLOCK_M=bm, GROUP_M=group_m, **gu,
    )
    _down_kernel[(m_tiles * triton.cdiv(hdim, dn["BLOCK_N"]),)](
        h, down, out_k, sorted_ids, block_expert, weights, t * k, e, hdim, inter,
        h.stride(0), down.stride(0), down.stride(1), out_k.stride(0), m_tiles,
        UPCAST=upcast, BLOCK_M=bm, GROUP_M=group_m, **dn,
    )
    return out_k.view(t, k, hdim).sum(dim=1)  # [T, H]


_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def _launch_args(tile: dict) -> dict:
    """A kernel's tile entry without the TMA-only keys."""
    return {key: v for key, v in tile.items() if key not in ("persistent", "flatten")}


def _fused_moe_tma(hidden, top_k_index, top_k_weights, gate_up, down, first_expert, act, cfg) -> Tensor:
    """fused_moe through the TMA kernels (same contract)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    t, hdim = hidden.shape
    e, two_i, _ = gate_up.shape
    inter, k, bm = two_i // 2, top_k_index.shape[1], cfg["BLOCK_M"]
    sorted_ids, token_of, block_expert, tiles_used = moe_align(top_k_index, first_expert, e, bm)
    p = sorted_ids.numel()
    xs = hidden.index_select(0, token_of)  # [P, H] rows in sorted order (padding slots take row 0)
    weights = top_k_weights.reshape(-1).contiguous()  # [T·K]
    h = torch.empty(p, inter, dtype=hidden.dtype, device=hidden.device)  # [P, I]
    out_k = torch.zeros(t * k, hdim, dtype=hidden.dtype, device=hidden.device)  # [T·K, H]
    gu, dn = cfg["gate_up"], cfg["down"]
    group_m, upcast = cfg.get("GROUP_M", 8), _interpreting()
    w_gu = gate_up.view(e * two_i, hdim)  # [E·2I, H]
    w_dn = down.view(e * hdim, inter)  # [E·H, I]

    def progs(tile: dict, n_tiles: int) -> int:
        if not tile.get("persistent"):
            return (p // bm) * n_tiles  # one program per tile of the static bound
        sms = 4 if _interpreting() else _sm_count(hidden.device.index or 0)
        return min(sms * tile.get("persistent", 1), (p // bm) * n_tiles)

    n_gu = progs(gu, triton.cdiv(inter, gu["BLOCK_N"]))
    _gate_up_tma_kernel[(n_gu,)](
        TensorDescriptor.from_tensor(xs, [bm, gu["BLOCK_K"]]),
        TensorDescriptor.from_tensor(w_gu, [gu["BLOCK_N"], gu["BLOCK_K"]]),
        TensorDescriptor.from_tensor(h, [bm, gu["BLOCK_N"]]),
        block_expert, tiles_used, inter, hdim, n_gu,
        ACT=ACTIVATIONS[act], UPCAST=upcast, FLATTEN=bool(gu.get("flatten")), OUT_DTYPE=_TL_DTYPES[hidden.dtype],
        BLOCK_M=bm, GROUP_M=group_m,
        **_launch_args(gu),
    )
    n_dn = progs(dn, triton.cdiv(hdim, dn["BLOCK_N"]))
    _down_tma_kernel[(n_dn,)](
        TensorDescriptor.from_tensor(h, [bm, dn["BLOCK_K"]]),
        TensorDescriptor.from_tensor(w_dn, [dn["BLOCK_N"], dn["BLOCK_K"]]),
        out_k, sorted_ids, block_expert, weights, tiles_used, t * k, hdim, inter, out_k.stride(0), n_dn,
        UPCAST=upcast, FLATTEN=bool(dn.get("flatten")), BLOCK_M=bm, GROUP_M=group_m, **_launch_args(dn),
    )
    return out_k.view(t, k, hdim).sum(dim=1)  # [T, H]
