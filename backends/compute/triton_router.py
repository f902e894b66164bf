"""Softmax top-k routing after the router's matmul, in one Triton kernel (msc::router on a GPU).

Mixtral-style routing is softmax over the experts in float32, the k largest, renormalised to sum 1: in torch a
cast, a softmax, a top-k (a sort and a gather on a GPU) and a sum and a division, five or six kernels at decode
sizes. Here one program routes BLOCK_T tokens: p = exp(l - max l) / sum, the k largest logits by repeated
arg-max (the lowest expert id among equal logits), their p each divided by the k's sum.

The float32 sum of exponentials is reduced in another order than torch's softmax: a weight can differ in its
last bit, and only an exact tie between two experts' probabilities could pick another expert.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_EXPERTS = 1024  # more experts take the eager path (one program holds a token's logits in registers)


@triton.jit
def _softmax_topk_kernel(logits_ptr, w_ptr, idx_ptr, n_tokens, n_experts, stride_l,
                         K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [T]
    cols = tl.arange(0, BLOCK_E)  # [E]
    row_ok = rows < n_tokens
    mask = row_ok[:, None] & (cols < n_experts)[None, :]
    logits = tl.load(logits_ptr + rows[:, None] * stride_l + cols[None, :], mask=mask, other=float("-inf"))
    logits = logits.to(tl.float32)
    m = tl.where(row_ok, tl.max(logits, axis=1), 0.0)  # [T] (padding rows: 0, so nothing is inf - inf)
    e = tl.where(mask, tl.exp(logits - m[:, None]), 0.0)
    z = tl.where(row_ok, tl.sum(e, axis=1), 1.0)
    p = e / z[:, None]  # [T, E] softmax
    # NOTE: chosen by the logits themselves (softmax keeps their order): probabilities rounded in another order
    # than torch's could otherwise pick another of two experts whose logits differ in the last bit
    key = tl.where(mask, logits, float("-inf"))
    ks = tl.arange(0, BLOCK_K)  # [Kp]
    top_w = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    top_i = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    total = tl.zeros([BLOCK_T], dtype=tl.float32)
    for k in tl.static_range(K):
        best = tl.max(key, axis=1)  # [T]
        at = tl.min(tl.where((key == best[:, None]) & mask, cols[None, :], BLOCK_E), axis=1)  # [T] lowest id of equals
        at = tl.where(row_ok, at, 0)
        chosen = cols[None, :] == at[:, None]  # [T, E]
        pk = tl.sum(tl.where(chosen, p, 0.0), axis=1)  # [T] its probability
        top_w = tl.where(ks[None, :] == k, pk[:, None], top_w)
        top_i = tl.where(ks[None, :] == k, at[:, None], top_i)
        total += pk
        key = tl.where(chosen, float("-inf"), key)
    total = tl.where(row_ok, total, 1.0)
    out_mask = row_ok[:, None] & (ks < K)[None, :]
    tl.store(w_ptr + rows[:, None] * K + ks[None, :], top_w / total[:, None], mask=out_mask)
    tl.store(idx_ptr + rows[:, None] * K + ks[None, :], top_i.to(tl.int64), mask=out_mask)


def supported(logits: Tensor, top_k: int) -> bool:
    return (logits.is_cuda and logits.dim() == 2 and 1 <= top_k <= logits.shape[1] <= MAX_EXPERTS
            and logits.stride(1) == 1 and logits.dtype in (torch.bfloat16, torch.float16, torch.float32))


def softmax_topk(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """logits [T, E] -> (weights [T, K] float32 summing to 1, expert ids [T, K] int64), largest first."""
    t, e = logits.shape
    w = torch.empty(t, top_k, dtype=torch.float32, device=logits.device)
    idx = torch.empty(t, top_k, dtype=torch.int64, device=logits.device)
    if t:
        block_e = triton.next_power_of_2(e)
        block_t = max(1, min(64, 4096 // block_e))
        _softmax_topk_kernel[(triton.cdiv(t, block_t),)](
            logits, w, idx, t, e, logits.stride(0), K=top_k, BLOCK_T=block_t, BLOCK_E=block_e,
            BLOCK_K=triton.next_power_of_2(top_k), num_warps=4)
    return w, idx
