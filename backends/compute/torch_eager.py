"""Reference (eager PyTorch) implementations of the pure msc ops: router and experts."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from msc.errors import MscError


def softmax_topk_router(hidden: Tensor, weight: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Mixtral-style routing: softmax over all experts, keep top-k, renormalise to sum 1."""
    return softmax_topk(F.linear(hidden, weight), top_k)  # logits [T, E]


def softmax_topk(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """The routing of softmax_topk_router from the router's logits [T, E]."""
    probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
    top_w, top_i = torch.topk(probs, top_k, dim=-1)  # [T, K]
    top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    return top_w, top_i


# ---------------------------------------------------------------------------------------------- experts
# Activations by the names transformers configs use (`hidden_act`), plus GPT-OSS's clamped SwiGLU.
_ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),
    "gelu_fast": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),  # Nemotron-H's experts (ReLU squared)
}
# NOTE: up_only: experts without a gate projection (Nemotron-H): `gate_up` holds the up projection [E, I, H] and
# the activation applies to it alone
LAYOUT_FLAGS = frozenset({"gate_up_t", "down_t", "interleaved", "up_only"})


@functools.lru_cache(maxsize=64)
def parse_activation(act: str):
    """`act` -> gate function g(gate, up) -> [n, I]. Plain names are act(gate) * up; `gpt_oss:ALPHA:LIMIT`
    is GPT-OSS's clamped form (up + 1) * gate * sigmoid(ALPHA * gate) with gate <= LIMIT, |up| <= LIMIT."""
    if act.startswith("gpt_oss:"):
        try:
            _, alpha, limit = act.split(":")
            alpha, limit = float(alpha), float(limit)
        except ValueError:
            raise MscError(f"experts activation '{act}' is malformed: expected gpt_oss:ALPHA:LIMIT with two numbers") from None

        def gpt_oss(gate: Tensor, up: Tensor) -> Tensor:
            gate = gate.clamp(max=limit)
            up = up.clamp(min=-limit, max=limit)
            return (up + 1) * gate * torch.sigmoid(gate * alpha)

        return gpt_oss
    fn = _ACTIVATIONS.get(act)
    if fn is None:
        raise MscError(f"experts activation '{act}' is not supported (known: {', '.join(sorted(_ACTIVATIONS))}, gpt_oss:A:L)")
    return lambda gate, up: fn(gate) * up


def _up_only_fn(act: str):
    """The activation of up-only experts: a plain name (no gated form)."""
    fn = _ACTIVATIONS.get(act)
    if fn is None:
        raise MscError(f"experts activation '{act}' is not supported for experts without a gate (known: "
                       f"{', '.join(sorted(_ACTIVATIONS))})")
    return lambda up, _unused: fn(up)


@functools.lru_cache(maxsize=64)
def parse_layout(layout: str) -> frozenset[str]:
    flags = frozenset(f for f in layout.split(",") if f)
    if flags - LAYOUT_FLAGS:
        raise MscError(f"experts layout '{layout}': unknown flags {sorted(flags - LAYOUT_FLAGS)} (known: {sorted(LAYOUT_FLAGS)})")
    return flags


def gated_experts(
    hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor, gate_up: Tensor, down: Tensor, first_expert: int,
    gate_up_bias: Tensor | None = None, down_bias: Tensor | None = None, act: str = "silu", layout: str = "",
) -> Tensor:
    """Gated experts over the slice [first_expert, first_expert + E_local); other ids are skipped.

    hidden [T, H]; top_k_index / top_k_weights [T, K].
    gate_up [E_local, 2I, H] (gate rows then up rows), or [E_local, H, 2I] with layout flag `gate_up_t`;
    with `interleaved` the gate and up rows alternate (gate_0, up_0, gate_1, ...).
    down [E_local, H, I], or [E_local, I, H] with `down_t`. Optional biases [E_local, 2I] and [E_local, H].
    """
    flags = parse_layout(layout)
    gate_fn = _up_only_fn(act) if "up_only" in flags else parse_activation(act)
    out = torch.zeros_like(hidden)  # [T, H]
    local = top_k_index - first_expert  # [T, K]
    for e in range(gate_up.shape[0]):
        token_idx, k_pos = torch.where(local == e)  # [n], [n]
        if token_idx.numel() == 0:
            continue
        x = hidden[token_idx]  # [n, H]
        gu = x @ gate_up[e] if "gate_up_t" in flags else F.linear(x, gate_up[e])  # [n, 2I]
        if gate_up_bias is not None:
            gu = gu + gate_up_bias[e]
        gate, up = _gate_and_up(gu, flags)  # [n, I] each (up-only: the up projection twice)
        h = gate_fn(gate, up)  # [n, I]
        y = h @ down[e] if "down_t" in flags else F.linear(h, down[e])  # [n, H]
        if down_bias is not None:
            y = y + down_bias[e]
        y = y * top_k_weights[token_idx, k_pos, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out


def _gate_and_up(gu: Tensor, flags: frozenset[str]) -> tuple[Tensor, Tensor]:
    if "up_only" in flags:
        return gu, gu
    return (gu[..., ::2], gu[..., 1::2]) if "interleaved" in flags else gu.chunk(2, dim=-1)


def gated_experts_static(
    hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor, gate_up: Tensor, down: Tensor, first_expert: int,
    gate_up_bias: Tensor | None = None, down_bias: Tensor | None = None, act: str = "silu", layout: str = "",
) -> Tensor:
    """gated_experts with static shapes: every local expert runs on every token and the routing weights (zero
    where a token did not pick the expert) select, so nothing depends on the data's values and a CUDA graph
    can capture it. NOTE: E_local / K times the FLOPs of the loop, but a decode step reads every expert's
    weights either way once the batch hits most experts; the engine takes it only while capturing."""
    flags = parse_layout(layout)
    gate_fn = _up_only_fn(act) if "up_only" in flags else parse_activation(act)
    e_local = gate_up.shape[0]
    local = top_k_index - first_expert  # [T, K]
    experts = torch.arange(e_local, device=hidden.device)  # [E]
    weight = ((local[:, :, None] == experts) * top_k_weights[:, :, None]).sum(1)  # [T, E]
    if "gate_up_t" in flags:
        gu = torch.einsum("th,ehi->eti", hidden, gate_up)  # [E, T, 2I]
    else:
        gu = torch.einsum("th,eih->eti", hidden, gate_up)  # [E, T, 2I]
    if gate_up_bias is not None:
        gu = gu + gate_up_bias[:, None, :]
    gate, up = _gate_and_up(gu, flags)  # [E, T, I] each
    h = gate_fn(gate, up)  # [E, T, I]
    y = torch.einsum("eti,eih->eth", h, down) if "down_t" in flags else torch.einsum("eti,ehi->eth", h, down)  # [E, T, H]
    if down_bias is not None:
        y = y + down_bias[:, None, :]
    return torch.einsum("eth,te->th", y, weight.to(y.dtype)).to(hidden.dtype)  # [T, H]


def swiglu_experts(
    hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor, gate_up: Tensor, down: Tensor, first_expert: int
) -> Tensor:
    """SiLU-gated experts (Mixtral's form): gated_experts with the default activation and layout."""
    return gated_experts(hidden, top_k_index, top_k_weights, gate_up, down, first_expert)
