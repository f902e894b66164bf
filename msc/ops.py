"""The `msc` custom-op namespace: the opaque boundaries of the IR.

Capture swaps a model's attention, router and experts for these ops so that torch.export sees one
node per MoE boundary with shape-generic fake implementations. Later passes add the communication
ops (`dispatch` / `combine` on the attention side, `expert_recv` / `expert_send` on the expert side).

Shapes use the packed-token layout of the runtime: T tokens of all sequences in one step side by side,
H hidden size, K experts per token, E experts of a layer.

NOTE: ops that hold state (the KV cache) or talk to peers look up the *runtime context*
(`msc.runtime.context`), so the graph stays a pure description and the same program runs under any
transport or cache implementation. Pure ops (router, experts) compute directly.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from msc import env as msc_env
from msc.backends.compute import torch_eager
from msc.runtime import routing_recorder


def _ctx():
    from msc.runtime.context import current

    return current()


# ---------------------------------------------------------------- attention (with its KV cache)
@torch.library.custom_op("msc::attention", mutates_args=())
def attention(
    q: Tensor, k: Tensor, v: Tensor, layer: int, scaling: float, sliding_window: int, sinks: Optional[Tensor] = None
) -> Tensor:
    """Causal attention of the new tokens over the cache; q [1, nh, T, d], k [1, nkv, T, d], v [1, nkv, T, dv]
    -> [1, T, nh, dv]. `sinks` [nh] (GPT-OSS): one extra logit per head that takes softmax mass and no value."""
    return _ctx().attention(q, k, v, layer, scaling, sliding_window, sinks)


@attention.register_fake
def _attention_fake(q, k, v, layer, scaling, sliding_window, sinks=None):
    b, nh, t, _ = q.shape
    return q.new_empty(b, t, nh, v.shape[-1])


@torch.library.custom_op("msc::mla_attention", mutates_args=())
def mla_attention(
    q: Tensor, latent: Tensor, k_rot: Tensor, kv_b: Tensor, layer: int, scaling: float, sliding_window: int,
    nope_dim: int, v_head_dim: int, indices: Optional[Tensor] = None,
) -> Tensor:
    """Multi-head latent attention (DeepSeek's MLA) whose cache keeps the compressed latent, not expanded heads.

    q [1, nh, T, dn + dr] (no-position part, then the rotary part), latent [1, 1, T, r] (normalised), k_rot
    [1, 1, T, dr] (rotary key shared by every head), kv_b [nh·(dn + dv), r] (kv_b_proj's weight: per head, dn
    key rows then dv value rows) -> [1, T, nh, dv]. It equals attention over keys cat(latent·W_kᵀ, k_rot) and
    values latent·W_vᵀ of every head; the runtime caches cat(latent, k_rot) once per token (r + dr values).
    `indices` [1, T, topk] (DeepSeek's sparse attention, from msc::dsa_index): each query attends only to those
    positions of its own sequence (-1: none)."""
    return _ctx().mla_attention(q, latent, k_rot, kv_b, layer, scaling, sliding_window, nope_dim, v_head_dim, indices)


@mla_attention.register_fake
def _mla_attention_fake(q, latent, k_rot, kv_b, layer, scaling, sliding_window, nope_dim, v_head_dim, indices=None):
    b, nh, t, _ = q.shape
    return q.new_empty(b, t, nh, v_head_dim)


@torch.library.custom_op("msc::dsa_index", mutates_args=())
def dsa_index(q: Tensor, k: Tensor, weights: Tensor, layer: int, topk: int, scale: float) -> Tensor:
    """DeepSeek sparse attention's indexer: caches each token's indexer key k [1, T, D] and, for every query q
    [1, T, Hi, D] with head weights [1, T, Hi], scores its sequence's keys so far as Σ_h w_h·relu(q_h·k)·scale and
    returns the positions of the top `topk` -> [1, T, topk] int64 (-1 past the sequence's length)."""
    return _ctx().dsa_index(q, k, weights, layer, topk, scale)


@dsa_index.register_fake
def _dsa_index_fake(q, k, weights, layer, topk, scale):
    return q.new_empty(1, q.shape[1], topk, dtype=torch.int64)


# ---------------------------------------------------------------- state layers (per-sequence state, issue 26)
@torch.library.custom_op("msc::causal_conv1d", mutates_args=())
def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor], layer: int, index: int, activation: str) -> Tensor:
    """Depthwise causal convolution of a state layer over each sequence's own past (a short convolution):
    x [1, C, T], weight [C, K], bias [C] -> [1, C, T], then `activation` ("" for none). The runtime keeps each
    sequence's last K - 1 inputs (its conv state; `index` tells a layer's several convolutions apart)."""
    return _ctx().causal_conv1d(x, weight, bias, layer, index, activation)


@causal_conv1d.register_fake
def _causal_conv1d_fake(x, weight, bias, layer, index, activation):
    return torch.empty_like(x)


@torch.library.custom_op("msc::gated_delta_rule", mutates_args=())
def gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, layer: int, qk_l2norm: bool) -> Tensor:
    """Gated delta rule linear attention (Gated DeltaNet: Qwen3-Next, Qwen3.5) over each sequence's recurrent
    state S [Hv, dk, dv]: per token S <- exp(g)·S; S <- S + k ⊗ β(v - Sᵀk); o = Sᵀq (q scaled by dk^-½, q and k
    L2-normalised when qk_l2norm). q, k [1, T, Hk, dk], v [1, T, Hv, dv], beta [1, T, Hv], g (log decay) [1, T, Hv]
    per head or [1, T, Hv, dk] per key channel (Kimi delta attention) -> [1, T, Hv, dv] in q's dtype; each key
    head serves Hv / Hk value heads."""
    return _ctx().gated_delta_rule(q, k, v, g, beta, layer, qk_l2norm)


@gated_delta_rule.register_fake
def _gated_delta_rule_fake(q, k, v, g, beta, layer, qk_l2norm):
    return v.new_empty(v.shape, dtype=q.dtype)


@torch.library.custom_op("msc::mamba2_scan", mutates_args=())
def mamba2_scan(x: Tensor, b: Tensor, c: Tensor, dt: Tensor, a_log: Tensor, d: Tensor, dt_bias: Tensor, layer: int,
                heads: int, groups: int, dt_min: float, dt_max: float) -> Tensor:
    """Mamba-2's selective scan (state space duality: Nemotron-H, Granite-4 hybrids) over each sequence's state
    h [heads, P, N]: per token dt = clamp(softplus(dt + dt_bias), dt_min, dt_max), h <- exp(dt·A)·h + dt·x ⊗ B,
    y = h·C + D·x with A = -exp(a_log); head h reads group h // (heads / groups) of B and C. x [1, T, heads·P],
    b, c [1, T, groups·N], dt [1, T, heads], a_log, d, dt_bias [heads] -> [1, T, heads·P] in x's dtype."""
    return _ctx().mamba2_scan(x, b, c, dt, a_log, d, dt_bias, layer, heads, groups, dt_min, dt_max)


@mamba2_scan.register_fake
def _mamba2_scan_fake(x, b, c, dt, a_log, d, dt_bias, layer, heads, groups, dt_min, dt_max):
    return torch.empty_like(x)


@torch.library.custom_op("msc::mamba_scan", mutates_args=())
def mamba_scan(x: Tensor, dt: Tensor, b: Tensor, c: Tensor, gate: Tensor, a_log: Tensor, d: Tensor,
               dt_bias: Optional[Tensor], layer: int) -> Tensor:
    """Mamba's selective scan (Jamba) over each sequence's state h [I, N]: per token dt = softplus(dt + dt_bias),
    h <- exp(dt·A)·h + dt·x·B, y = (h·C + D·x)·silu(gate) with A = -exp(a_log). x, dt, gate [1, I, T], b, c
    [1, T, N], a_log [I, N], d, dt_bias [I] -> [1, I, T] in x's dtype."""
    return _ctx().mamba_scan(x, dt, b, c, gate, a_log, d, dt_bias, layer)


@mamba_scan.register_fake
def _mamba_scan_fake(x, dt, b, c, gate, a_log, d, dt_bias, layer):
    return torch.empty_like(x)


@torch.library.custom_op("msc::linear_attention", mutates_args=())
def linear_attention(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, layer: int) -> Tensor:
    """Decayed linear attention (MiniMax's lightning attention) over each sequence's state S [H, dk, dv]: per token
    S <- exp(log_decay)·S + k ⊗ v, o = Sᵀq (no scaling, no normalisation). q, k [1, T, H, dk], v [1, T, H, dv],
    log_decay [H] (<= 0) -> [1, T, H, dv] in q's dtype."""
    return _ctx().linear_attention(q, k, v, log_decay, layer)


@linear_attention.register_fake
def _linear_attention_fake(q, k, v, log_decay, layer):
    return v.new_empty(v.shape, dtype=q.dtype)


# ---------------------------------------------------------------- tensor parallelism
@torch.library.custom_op("msc::tp_all_reduce", mutates_args=())
def tp_all_reduce(x: Tensor, layer: int) -> Tensor:
    """The sum of x over this role's tensor-parallel ranks (after a row-parallel projection); the identity
    outside a tensor-parallel group. `layer` names the layer in traces and errors."""
    from msc.runtime import tensor_parallel

    out = tensor_parallel.all_reduce(x)
    return out if out is not x else x.clone()  # NOTE: a custom op may not return an alias of its input


@tp_all_reduce.register_fake
def _tp_all_reduce_fake(x, layer):
    return torch.empty_like(x)


@torch.library.custom_op("msc::tp_all_gather", mutates_args=())
def tp_all_gather(x: Tensor, dim: int, parts: int) -> Tensor:
    """This role's tensor-parallel ranks' x side by side along `dim` (rank order), `parts` of them (a
    vocabulary-parallel LM head's logits); the identity outside a tensor-parallel group."""
    from msc.runtime import tensor_parallel

    out = tensor_parallel.all_gather(x, dim)
    return out if out is not x else x.clone()


@tp_all_gather.register_fake
def _tp_all_gather_fake(x, dim, parts):
    shape = list(x.shape)
    shape[dim] *= parts
    return x.new_empty(shape)


def _triton_backend(name: str):
    """msc.backends.compute.<name> (a Triton kernel module), or None where Triton is not installed."""
    import importlib

    try:
        return importlib.import_module(f"msc.backends.compute.{name}")
    except ImportError:
        return None


# ---------------------------------------------------------------- RMSNorm (fused at load: msc.fusions)
def _rms_norm_eager(x: Tensor, weight: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    """The ops transformers' RMSNorm is captured as, in the same order (so the CPU result is the unfused one)."""
    xf = x.to(torch.float32)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(dtype)


def _fused_norm_ok(x: Tensor, weight: Tensor, dtype: torch.dtype, residual: Optional[Tensor] = None) -> bool:
    """NOTE: on a GPU the Triton kernel runs by default (MSC_NORM_KERNEL=0 turns it off: the fused op then
    runs the unfused aten ops, what the program ran before the fusion)."""
    if not x.is_cuda or dtype != x.dtype or not msc_env.switch("MSC_NORM_KERNEL"):
        return False
    triton_norm = _triton_backend("triton_norm")
    return triton_norm is not None and triton_norm.supported(x, weight, residual)


@torch.library.custom_op("msc::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    """weight * (x32 * rsqrt(mean(x32², -1) + eps)).to(dtype), x32 = x in float32: transformers' RMSNorm as one
    op (msc.fusions puts it where the graph has those ops). One Triton kernel on a GPU, the same ops on a CPU."""
    if _fused_norm_ok(x, weight, dtype):
        from msc.backends.compute import triton_norm

        return triton_norm.rms_norm(x, weight, eps)[0]
    return _rms_norm_eager(x, weight, eps, dtype)


@rms_norm.register_fake
def _rms_norm_fake(x, weight, eps, dtype):
    return torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, dtype), device=x.device)


@torch.library.custom_op("msc::add_rms_norm", mutates_args=())
def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(rms_norm(x + residual), x + residual): the residual add before a norm, fused with it; the sum is the
    next residual."""
    if _fused_norm_ok(x, weight, dtype, residual):
        from msc.backends.compute import triton_norm

        return triton_norm.rms_norm(x, weight, eps, residual)
    s = x + residual
    return _rms_norm_eager(s, weight, eps, dtype), s


@add_rms_norm.register_fake
def _add_rms_norm_fake(x, residual, weight, eps, dtype):
    s = torch.empty(torch.broadcast_shapes(x.shape, residual.shape), dtype=torch.promote_types(x.dtype, residual.dtype),
                    device=x.device)
    return torch.empty(s.shape, dtype=torch.promote_types(weight.dtype, dtype), device=x.device), s


# ---------------------------------------------------------------- rotary (fused at load: msc.fusions)
def _rotary_eager(x: Tensor, cos: Tensor, sin: Tensor, dim: int, half: int, cat_dim: int) -> Tensor:
    """The ops transformers' apply_rotary_pos_emb is captured as (x * cos + rotate_half(x) * sin)."""
    rotated = torch.cat((-x.narrow(dim, half, x.shape[dim] - half), x.narrow(dim, 0, half)), cat_dim)
    return x * cos + rotated * sin


@torch.library.custom_op("msc::rotary", mutates_args=())
def rotary(x: Tensor, cos: Tensor, sin: Tensor, dim: int, half: int, cat_dim: int) -> Tensor:
    """x * cos + cat(-x[half:], x[:half]) * sin (halves sliced along `dim`, joined along `cat_dim`):
    transformers' rotary embedding of q or k as one op (msc.fusions puts it where the graph has those ops). One
    Triton kernel on a GPU, giving the unfused ops' values bit for bit (backends/compute/triton_rotary.py); the
    same ops on a CPU."""
    last = (-1, x.dim() - 1)
    triton_rotary = _triton_backend("triton_rotary") if x.is_cuda and dim in last and cat_dim in last else None
    if triton_rotary is not None and triton_rotary.supported(x, cos, sin, half):
        return triton_rotary.rotary(x, cos, sin, half)
    return _rotary_eager(x, cos, sin, dim, half, cat_dim)


@rotary.register_fake
def _rotary_fake(x, cos, sin, dim, half, cat_dim):
    shape = torch.broadcast_shapes(x.shape, cos.shape, sin.shape)
    return torch.empty(shape, dtype=torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype),
                       device=x.device)


# ---------------------------------------------------------------- router
@torch.library.custom_op("msc::router", mutates_args=())
def router(hidden: Tensor, weight: Tensor, top_k: int, layer: int) -> tuple[Tensor, Tensor]:
    """Softmax top-k routing, renormalised: hidden [T, H], weight [E, H] -> (weights [T, K] f32, index [T, K] i64).
    On a GPU the matmul, then one Triton kernel for the rest (backends/compute/triton_router.py)."""
    logits = torch.nn.functional.linear(hidden, weight)  # [T, E]
    triton_router = _triton_backend("triton_router") if hidden.is_cuda else None
    if triton_router is not None and triton_router.supported(logits, top_k):
        return triton_router.softmax_topk(logits, top_k)
    return torch_eager.softmax_topk(logits, top_k)


@router.register_fake
def _router_fake(hidden, weight, top_k, layer):
    t = hidden.shape[0]
    return hidden.new_empty(t, top_k, dtype=torch.float32), hidden.new_empty(t, top_k, dtype=torch.int64)


# ---------------------------------------------------------------- experts
@torch.library.custom_op("msc::experts", mutates_args=())
def experts(
    hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor, gate_up: Tensor, down: Tensor, layer: int, first_expert: int,
    gate_up_bias: Optional[Tensor] = None, down_bias: Optional[Tensor] = None, act: str = "silu", layout: str = "",
) -> Tensor:
    """Weighted sum of the experts this weight slice holds (global ids first_expert..first_expert+E_local-1).

    hidden [T, H], top_k_index/top_k_weights [T, K], gate_up [E_local, 2I, H], down [E_local, H, I] -> [T, H];
    optional biases [E_local, 2I] / [E_local, H]; `act` the gate activation (a transformers `hidden_act` name
    or `gpt_oss:ALPHA:LIMIT`); `layout` flags for other storage orders (gate_up_t, down_t, interleaved; see
    backends/compute/torch_eager.gated_experts). Ids outside the slice contribute nothing, so partial sums
    over expert nodes add up to the full layer.
    """
    if routing_recorder.ACTIVE is not None and first_expert == 0:  # msc run --colocated --record-routing
        routing_recorder.ACTIVE.add(layer, top_k_index)
    if hidden.is_cuda and _fused_moe_ok(act, layout, gate_up_bias, down_bias):
        from msc.backends.compute import triton_moe

        return triton_moe.fused_moe(hidden, top_k_index, top_k_weights, gate_up, down, first_expert, act)
    # NOTE: the eager loop indexes by the routing's values (a host sync): inside CUDA-graph capture (GPT-OSS's
    # biased, interleaved experts on a GPU) the static form runs instead
    eager = (torch_eager.gated_experts_static if hidden.is_cuda and torch.cuda.is_current_stream_capturing()
             else torch_eager.gated_experts)
    return eager(hidden, top_k_index, top_k_weights, gate_up, down, first_expert, gate_up_bias, down_bias, act, layout)


def _fused_moe_ok(act: str, layout: str, gate_up_bias, down_bias) -> bool:
    """NOTE: on a GPU the experts run in the fused Triton kernel where it covers the call (the default layout,
    no biases, an activation it applies in registers); everything else, and every CPU run, takes the eager
    reference. MSC_EXPERTS=eager forces the reference (for comparisons)."""
    if msc_env.choice("MSC_EXPERTS") == "eager":
        return False
    try:
        from msc.backends.compute import triton_moe
    except ImportError:  # triton not installed
        return False
    return triton_moe.supported(act, layout, gate_up_bias, down_bias)


@experts.register_fake
def _experts_fake(hidden, top_k_index, top_k_weights, gate_up, down, layer, first_expert, gate_up_bias=None,
                  down_bias=None, act="silu", layout=""):
    return torch.empty_like(hidden)


# Positions of the experts op's weight arguments (each a get_attr node in a captured graph, or None).
EXPERT_WEIGHT_ARGS = (3, 4, 7, 8)


def expert_weight_nodes(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The weight tensors an experts call reads (gate_up, down and the biases it has), as graph nodes."""
    return [node.args[i] for i in EXPERT_WEIGHT_ARGS if i < len(node.args) and isinstance(node.args[i], torch.fx.Node)]


# ---------------------------------------------------------------- the cut made by split_roles
@torch.library.custom_op("msc::remote_experts", mutates_args=())
def remote_experts(hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor, layer: int) -> Tensor:
    """Placeholder left on the attention side by `split_roles`; `insert_dispatch_combine` replaces it."""
    raise RuntimeError("msc::remote_experts is a compile-time placeholder; run the insert_dispatch_combine pass")


@remote_experts.register_fake
def _remote_experts_fake(hidden, top_k_index, top_k_weights, layer):
    return torch.empty_like(hidden)


# ---------------------------------------------------------------- expert placement (attention side)
_SLOT_TABLES: dict = {}  # (layer, device, tables) -> (slot_of [E, C] int64, cum [E, C] f32) on that device


@torch.library.custom_op("msc::expert_slots", mutates_args=())
def expert_slots(top_k_index: Tensor, layer: int, slot_of: list[int], cum_share: list[float], copies: int) -> Tensor:
    """Each (token, expert) pair's slot under a placement that moves or replicates experts (passes/place_experts):
    top_k_index [T, K] expert ids -> [T, K] slot ids. Copy c of expert e sits in slot slot_of[e·C + c] (C =
    `copies`, the most any expert has; missing copies repeat the last) and takes the pairs whose token's
    fraction u falls below cum_share[e·C + c] and above the previous copy's: u = frac(t·φ) over the token
    index t (a low-discrepancy sequence, so each copy gets its share of any run of tokens)."""
    key = (layer, top_k_index.device, tuple(slot_of), tuple(cum_share))
    tables = _SLOT_TABLES.get(key)
    if tables is None:  # NOTE: built on the first (eager) call and kept, so a CUDA-graph capture reuses them
        tables = _SLOT_TABLES[key] = (
            torch.tensor(slot_of, dtype=torch.int64, device=top_k_index.device).reshape(-1, copies),
            torch.tensor(cum_share, dtype=torch.float32, device=top_k_index.device).reshape(-1, copies))
    slots, cum = tables
    t = top_k_index.shape[0]
    u = torch.frac(torch.arange(t, device=top_k_index.device, dtype=torch.float32) * 0.6180339887498949)  # [T]
    idx = top_k_index.long()
    copy = (u[:, None, None] >= cum[idx][..., :-1]).sum(-1)  # [T, K]: copies whose upper threshold u passed
    return torch.gather(slots[idx], -1, copy.unsqueeze(-1)).squeeze(-1).to(top_k_index.dtype)  # [T, K]


@expert_slots.register_fake
def _expert_slots_fake(top_k_index, layer, slot_of, cum_share, copies):
    return torch.empty_like(top_k_index)


def slot_tables(slots: list[int], shares: list[float], num_experts: int) -> tuple[list[int], list[float], int]:
    """msc::expert_slots' arguments for a layer's placement (slot -> expert, slot -> share of its expert)."""
    by_expert: dict[int, list[int]] = {e: [] for e in range(num_experts)}
    for s, e in enumerate(slots):
        by_expert[e].append(s)
    missing = [e for e, ss in by_expert.items() if not ss]
    if missing:
        raise ValueError(f"expert {missing[0]} has no slot in the placement")
    c = max(len(ss) for ss in by_expert.values())
    slot_of, cum = [], []
    for e in range(num_experts):
        ss = by_expert[e]
        acc, row = 0.0, []
        for s in ss:
            acc += shares[s]
            row.append(acc)
        row[-1] = 2.0  # the last copy takes whatever is left (u < 1 always)
        slot_of += ss + [ss[-1]] * (c - len(ss))
        cum += row + [2.0] * (c - len(ss))
    return slot_of, cum, c


# ---------------------------------------------------------------- M2N communication (attention side)
@torch.library.custom_op("msc::dispatch", mutates_args=())
def dispatch(hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor, layer: int, expert_bounds: list[int]) -> Tensor:
    """Send each token to the expert nodes holding its top-k experts (node j holds ids bounds[j]..bounds[j+1]-1).

    Returns a ticket [1] (int64) that orders the matching `combine` after this send.
    """
    if routing_recorder.ACTIVE is not None:  # msc run --record-routing (an attention replica)
        routing_recorder.ACTIVE.add_slots(layer, top_k_index)
    return _ctx().dispatch(hidden, top_k_index, top_k_weights, layer, expert_bounds)


@dispatch.register_fake
def _dispatch_fake(hidden, top_k_index, top_k_weights, layer, expert_bounds):
    return hidden.new_empty(1, dtype=torch.int64)


@torch.library.custom_op("msc::combine", mutates_args=())
def combine(ticket: Tensor, hidden: Tensor, layer: int) -> Tensor:
    """Receive the expert nodes' partial outputs for `layer` and sum them per token -> [T, H] like hidden."""
    return _ctx().combine(ticket, hidden, layer)


@combine.register_fake
def _combine_fake(ticket, hidden, layer):
    return torch.empty_like(hidden)


# ---------------------------------------------------------------- M2N communication (expert side)
@torch.library.custom_op("msc::expert_recv", mutates_args=())
def expert_recv(layer: int, hidden_size: int, top_k: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Gather this layer's tokens from every attention node -> (hidden [T, H], index [T, K], weights [T, K])."""
    return _ctx().expert_recv(layer, hidden_size, top_k, dtype)


@expert_recv.register_fake
def _expert_recv_fake(layer, hidden_size, top_k, dtype):
    t = torch.library.get_ctx().new_dynamic_size()
    return (
        torch.empty(t, hidden_size, dtype=dtype),
        torch.empty(t, top_k, dtype=torch.int64),
        torch.empty(t, top_k, dtype=torch.float32),
    )


@torch.library.custom_op("msc::expert_send", mutates_args=())
def expert_send(hidden: Tensor, layer: int) -> None:
    """Send this layer's expert outputs back to the attention nodes the tokens came from."""
    _ctx().expert_send(hidden, layer)


@expert_send.register_fake
def _expert_send_fake(hidden, layer):
    return None


# NOTE: communication ops and the ops that write the runtime's caches (KV pages, indexer keys, state slots) have
# effects that fx cannot see, so dead-code elimination must keep them even when nothing reads their output.
SIDE_EFFECT_OPS = (
    torch.ops.msc.dispatch.default,
    torch.ops.msc.combine.default,
    torch.ops.msc.expert_recv.default,
    torch.ops.msc.expert_send.default,
    torch.ops.msc.attention.default,
    torch.ops.msc.mla_attention.default,
    torch.ops.msc.causal_conv1d.default,
    torch.ops.msc.gated_delta_rule.default,
    torch.ops.msc.mamba2_scan.default,
    torch.ops.msc.mamba_scan.default,
    torch.ops.msc.linear_attention.default,
    torch.ops.msc.dsa_index.default,
)
for _op in SIDE_EFFECT_OPS:
    torch.fx.node._side_effectful_functions.add(_op)

MSC_OPS = {
    "attention": torch.ops.msc.attention.default,
    "mla_attention": torch.ops.msc.mla_attention.default,
    "dsa_index": torch.ops.msc.dsa_index.default,
    "causal_conv1d": torch.ops.msc.causal_conv1d.default,
    "gated_delta_rule": torch.ops.msc.gated_delta_rule.default,
    "mamba2_scan": torch.ops.msc.mamba2_scan.default,
    "mamba_scan": torch.ops.msc.mamba_scan.default,
    "linear_attention": torch.ops.msc.linear_attention.default,
    "router": torch.ops.msc.router.default,
    "experts": torch.ops.msc.experts.default,
    "remote_experts": torch.ops.msc.remote_experts.default,
    "expert_slots": torch.ops.msc.expert_slots.default,
    "dispatch": torch.ops.msc.dispatch.default,
    "combine": torch.ops.msc.combine.default,
    "expert_recv": torch.ops.msc.expert_recv.default,
    "expert_send": torch.ops.msc.expert_send.default,
}


def is_op(node: torch.fx.Node, name: str) -> bool:
    """True when `node` calls the msc op `name` (e.g. ``is_op(n, "experts")``)."""
    return node.op == "call_function" and node.target is MSC_OPS[name]


STATE_OPS = ("causal_conv1d", "gated_delta_rule", "mamba2_scan", "mamba_scan", "linear_attention")


def is_state_op(node: torch.fx.Node) -> bool:
    """True for the ops of state layers (STATE_OPS: convolutions and recurrent scans): calls that own per-sequence
    state the attention role keeps beside its KV cache."""
    return node.op == "call_function" and any(node.target is MSC_OPS[n] for n in STATE_OPS)


def is_attention(node: torch.fx.Node) -> bool:
    """True for either attention op (msc::attention or msc::mla_attention): the calls that own a KV cache."""
    return is_op(node, "attention") or is_op(node, "mla_attention")
