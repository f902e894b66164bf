"""Reference (eager PyTorch) implementations of the pure msc ops: router and experts."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def softmax_topk_router(hidden: Tensor, weight: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Mixtral-style routing: softmax over all experts, keep top-k, renormalise to sum 1."""
    logits = F.linear(hidden, weight)  # [T, E]
    probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
    top_w, top_i = torch.topk(probs, top_k, dim=-1)  # [T, K]
    top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    return top_w, top_i


def swiglu_experts(
    hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor, gate_up: Tensor, down: Tensor, first_expert: int
) -> Tensor:
    """SiLU-gated experts over the slice [first_expert, first_expert + E_local); other ids are skipped.

    hidden [T, H]; gate_up [E_local, 2I, H] (gate rows then up rows); down [E_local, H, I].
    """
    out = torch.zeros_like(hidden)  # [T, H]
    local = top_k_index - first_expert  # [T, K]
    n_local = gate_up.shape[0]
    for e in range(n_local):
        token_idx, k_pos = torch.where(local == e)  # [n], [n]
        if token_idx.numel() == 0:
            continue
        x = hidden[token_idx]  # [n, H]
        gate, up = F.linear(x, gate_up[e]).chunk(2, dim=-1)  # [n, I] each
        y = F.linear(F.silu(gate) * up, down[e])  # [n, H]
        y = y * top_k_weights[token_idx, k_pos, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out
