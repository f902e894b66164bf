"""Performance model: time of one layer on each side per micro-batch, and of the whole decode step.

Default: a roofline with efficiency factors. One layer of one micro-batch costs
max(FLOPs / (tp · peak · eff_flops), bytes / (tp · bandwidth · eff_bw)) + a fixed per-layer overhead
(kernel launches, synchronisation), plus, for tp > 1, an all-reduce of the layer's activations over
NVLink. Communication between the sides moves each token's hidden vector once per chosen expert; its time
is the bytes over the NIC bandwidth times a utilisation curve util(s) = u_max · s / (s + s_half) of the
message size s (the paper measures such a curve; `s_half` and `u_max` are overridable).

With a measured profile (JSON, below) the attention and expert times come from its linear fits instead,
as in the paper: T_a ≈ k1·b_a + k2 (at the profile's context length, scaled linearly in context for the
KV term when `k1_ctx` is given) and T_e ≈ k3·b_e + k4, with b_e the tokens one expert node receives.

Profile format (what `msc profile` will write; every field in seconds, per layer per micro-batch):
    {"format": 1, "gpu": "H200", "model": "...", "context": 730,
     "attention": {"k1": 2.1e-6, "k2": 1.8e-4, "k1_ctx": 2.6e-9},   # optional k1_ctx: s per token per position
     "expert": {"k3": 4.0e-7, "k4": 2.2e-4}}
"""
from __future__ import annotations

import json
import math
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from msc.errors import MscError
from msc.planner.cost import LayerCost, ModelCost, attention_core_positions


class Efficiency(BaseModel):
    """Fractions of the datasheet peaks a real step reaches, and fixed costs (all overridable in the spec)."""

    model_config = ConfigDict(extra="forbid")
    flops: float = Field(0.6, gt=0, le=1)  # matmul efficiency at large batch
    bandwidth: float = Field(0.8, gt=0, le=1)  # HBM bandwidth efficiency (weights and KV streaming)
    layer_overhead_s: float = Field(25e-6, ge=0)  # per layer per micro-batch per side: launches, syncs
    nic_u_max: float = Field(0.9, gt=0, le=1)  # utilisation curve: u_max · s / (s + s_half)
    nic_s_half: float = Field(128 * 1024, gt=0)  # bytes at which the NIC reaches half of u_max
    nic_latency_s: float = Field(10e-6, ge=0)  # one message's fixed latency
    memory_fraction: float = Field(0.9, gt=0, le=1)  # usable part of GPU memory (the rest: runtime, fragmentation)


class LinearFit(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k1: float = Field(ge=0)
    k2: float = Field(ge=0)
    k1_ctx: float = Field(0.0, ge=0)


class ExpertFit(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k3: float = Field(ge=0)
    k4: float = Field(ge=0)
    # experts whose weights the measured layer held (k4 is mostly reading them once): a node that holds or
    # touches fewer pays k4 in proportion. None: k4 as measured, whatever the node holds.
    experts: Optional[int] = Field(None, ge=1)


class ExchangeFit(BaseModel):
    """What one attention <-> expert hand-off costs beyond the link model (bytes over bandwidth plus its
    latency), measured by `msc profile` as two role processes run on its GPU: the roles' decode step minus
    the colocated one, over two hand-offs per MoE layer (kernel syncs, flag waits, the sides' SM sharing)."""

    model_config = ConfigDict(extra="forbid")
    handoff_s: float = Field(ge=0)
    how: str = ""  # how the roles ran (the device exchange under MPS, or the host exchange)


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: int = 1
    gpu: str
    model: str = ""
    tp: int = Field(1, ge=1)  # the tensor-parallel size the fits were measured at (the planner keeps to it)
    context: float = Field(gt=0)
    attention: LinearFit
    expert: ExpertFit
    exchange: ExchangeFit | None = None  # absent: hand-offs cost the link model alone


def load_profile(path: str | Path) -> Profile:
    try:
        return Profile.model_validate(json.loads(Path(path).read_text()))
    except FileNotFoundError:
        raise MscError(f"profile {path} does not exist") from None
    except (json.JSONDecodeError, ValidationError) as e:
        raise MscError(f"profile {path} is not a valid msc profile: {str(e).splitlines()[0]}") from None


# NOTE: every time below is written once and holds elementwise for numpy arrays as well as for floats: the
# search evaluates all its configurations at once (`tp` of a Side, the batch, replicas, expert nodes and
# micro-batches may be arrays). The helpers keep floats floats, and the arithmetic is the same operations
# in the same order either way, so an array's elements equal the scalar results bit for bit.
def _max(a, b):
    return np.maximum(a, b) if isinstance(a, np.ndarray) or isinstance(b, np.ndarray) else max(a, b)


def _min(a, b):
    return np.minimum(a, b) if isinstance(a, np.ndarray) or isinstance(b, np.ndarray) else min(a, b)


def _pow(base: float, exp: np.ndarray) -> np.ndarray:
    """base ** exp elementwise through Python's float power (numpy's vectorised power may differ in the last bit)."""
    values, index = np.unique(exp, return_inverse=True)
    return np.array([base ** v for v in values.tolist()], dtype=np.float64)[index.reshape(exp.shape)]


@dataclass(frozen=True)
class Side:
    """One GPU group running one side: its GPU figures (SI units) times tp (an int, or an int array)."""

    flops: float
    mem_bw: float
    nic_bw: float
    nvlink_bw: float
    tp: int


def util(size: float, eff: Efficiency) -> float:
    if isinstance(size, np.ndarray):
        return np.where(size > 0, eff.nic_u_max * size / (size + eff.nic_s_half), eff.nic_u_max)
    return eff.nic_u_max * size / (size + eff.nic_s_half) if size > 0 else eff.nic_u_max


def _roofline(flops: float, nbytes: float, side: Side, eff: Efficiency) -> float:
    return _max(flops / (side.tp * side.flops * eff.flops), nbytes / (side.tp * side.mem_bw * eff.bandwidth))


def _allreduce(nbytes: float, side: Side) -> float:
    if isinstance(side.tp, np.ndarray):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(side.tp == 1, 0.0, 2.0 * nbytes * (side.tp - 1) / side.tp / side.nvlink_bw + 5e-6)
    if side.tp == 1:
        return 0.0
    return 2.0 * nbytes * (side.tp - 1) / side.tp / side.nvlink_bw + 5e-6


def _broadcast(nbytes: float, side: Side) -> float:
    """A tp group's leader sends nbytes to its other ranks (a pipelined broadcast over NVLink)."""
    if isinstance(side.tp, np.ndarray):
        return np.where(side.tp == 1, 0.0, nbytes / side.nvlink_bw + 5e-6)
    return 0.0 if side.tp == 1 else nbytes / side.nvlink_bw + 5e-6


def attention_layer_time(lc: LayerCost, b_a: float, ctx: float, side: Side, eff: Efficiency, model: ModelCost,
                         profile: Profile | None = None, disaggregated: bool = False) -> float:
    """One layer's attention side for a micro-batch of b_a sequences (one decode token each) at context ctx.

    NOTE: the collectives are those the compiled program runs (passes/shard_tensor_parallel.py): a
    disaggregated replica all-reduces the output projection and its leader broadcasts the combined expert
    output to the other ranks; a colocated instance all-reduces twice (attention and MLP, as vLLM does)."""
    if profile is not None:
        p = profile.attention
        return p.k1 * b_a + p.k2 + p.k1_ctx * b_a * (ctx - profile.context)
    pos = attention_core_positions(ctx, lc.window)
    flops = b_a * (lc.attn_flops_per_token + lc.core_flops_per_token_ctx * pos)
    kv = b_a * pos * lc.kv_bytes_per_token
    if lc.kv_heads:  # tp beyond the KV heads replicates them: each rank reads a whole head's cache
        kv = (np.where(side.tp > lc.kv_heads, kv * side.tp / lc.kv_heads, kv) if isinstance(side.tp, np.ndarray)
              else kv * side.tp / lc.kv_heads if side.tp > lc.kv_heads else kv)
    nbytes = lc.attn_weight_bytes + kv + 2 * b_a * lc.state_bytes_per_seq  # a state layer reads and writes its state
    act = b_a * model.hidden_size * model.dtype_bytes
    coll = _allreduce(act, side) + _broadcast(act, side) if disaggregated else 2 * _allreduce(act, side)
    return _roofline(flops, nbytes, side, eff) + eff.layer_overhead_s + coll


def head_time(model: ModelCost, b_a: float, side: Side, eff: Efficiency) -> float:
    """Embedding, final norm and head once per micro-batch (on the attention side)."""
    return _roofline(b_a * model.other_flops_per_token, model.other_weight_bytes, side, eff)


def expected_experts_hit(experts: int, tokens: float, top_k: int) -> float:
    """Expected number of distinct experts (of `experts`) chosen by `tokens` tokens with uniform top-k routing."""
    if isinstance(tokens, np.ndarray):
        miss = _pow(1.0 - top_k / experts, tokens) if experts > top_k else 0.0
        return np.where(tokens <= 0, 0.0, experts * (1.0 - miss))
    if tokens <= 0:
        return 0.0
    miss = (1.0 - top_k / experts) ** tokens if experts > top_k else 0.0
    return experts * (1.0 - miss)


def expert_layer_time(lc: LayerCost, tokens_global: float, experts_per_node: int, side: Side, eff: Efficiency,
                      model: ModelCost, profile: Profile | None = None, load: float = 1.0, extra_slots: int = 0) -> float:
    """One layer's expert side on one expert node for a micro-batch of `tokens_global` tokens (all replicas),
    with uniform routing: the node receives tokens·K·(experts_per_node / E) (token, expert) pairs; `load`: the
    busiest node's pairs over that (msc.planner.routing; 1.0 for uniform routing); `extra_slots`: copies of
    experts the node holds beyond its E / n_e (replicated placement), whose weights it reads too."""
    if not lc.moe:
        return 0.0
    pairs = tokens_global * model.top_k * experts_per_node / lc.experts * load
    # NOTE: weights read: the experts hit among those the node holds. A replica is a copy of a hot expert, so
    # it is counted like any held expert; at decode sizes this term, not the pairs, sets the roofline time (the
    # H100 placement runs of docs/placement.md did not settle the measured ordering at those sizes)
    held = experts_per_node + extra_slots
    hit = expected_experts_hit(lc.experts, tokens_global, model.top_k) * held / lc.experts  # <= held
    if profile is not None:
        fit = profile.expert
        return fit.k3 * pairs + fit.k4 * (hit / fit.experts if fit.experts else 1.0)
    flops = pairs * lc.expert_flops_per_token
    nbytes = hit * lc.expert_weight_bytes
    act = pairs * model.hidden_size * model.dtype_bytes
    # NOTE: as compiled: the node's leader broadcasts the tokens it received to its other tp ranks, and the
    # partial outputs are all-reduced inside the node before the leader answers
    return _roofline(flops, nbytes, side, eff) + eff.layer_overhead_s + _broadcast(act, side) + _allreduce(act, side)


def comm_time(model: ModelCost, b_a: float, tokens_global: float, expert_nodes: int, att: Side, exp: Side,
              eff: Efficiency, load: float = 1.0, profile: Profile | None = None) -> float:
    """One-way time of one layer's exchange: the replica sends b_a·K hidden vectors, an expert node receives
    tokens·K / n_e of them (the reference's T_c, with per-message utilisation); `load`: the busiest node's
    share over the uniform one; plus the profile's measured hand-off cost, where it has one."""
    vec = model.hidden_size * model.dtype_bytes
    send = b_a * model.top_k * vec
    recv = tokens_global * model.top_k * vec / expert_nodes * load
    msg_a = send / _max(1, _min(expert_nodes, b_a * model.top_k))  # one message per destination node
    msg_e = recv / _max(1.0, tokens_global / _max(b_a, 1e-9))  # one message per source replica
    # NOTE: one endpoint per replica and per expert node (its tp leader), whatever their tp: as compiled
    t_a = send / (att.nic_bw * util(msg_a, eff))
    t_e = recv / (exp.nic_bw * util(msg_e, eff))
    handoff = profile.exchange.handoff_s if profile is not None and profile.exchange is not None else 0.0
    return _max(t_a, t_e) + eff.nic_latency_s + handoff


@dataclass
class StepTimes:
    t_a: float  # summed over layers, one micro-batch (head included)
    t_e: float
    t_c: float
    total: float  # one decode step (all micro-batches through all layers)


def pipeline_total(t_a: list[float], t_e: list[float], t_c: list[float], m: int) -> float:
    """The reference's T_total = (T_a + T_e + 2·T_c) + T_f·(m·L − 1), written per layer so dense layers
    (T_e = T_c = 0) and differing layers fit; never below one micro-batch's own serial path plus the
    others' last slot.

    NOTE: T_f = max(T_a, T_e, T_c), not the reference's max(T_a, T_e): the micro-batches in flight share the
    link's bandwidth, so a layer's m transfers take m·T_c on it and the network is a pipeline stage of its
    own. Where the reference's condition T_c < T_f holds the two agree; where it fails, more micro-batches
    no longer hide the network (the simulator's shared_link mode is the same model, event by event)."""
    t_f = [max(a, e, c) for a, e, c in zip(t_a, t_e, t_c)]
    piped = (t_a[0] + t_e[0] + 2 * t_c[0]) + m * sum(t_f) - t_f[0]
    serial = sum(a + e + 2 * c for a, e, c in zip(t_a, t_e, t_c)) + (m - 1) * t_f[-1]
    return max(piped, serial)


def layer_groups(model: ModelCost) -> list[tuple[LayerCost, list[int]]]:
    """Layers with equal costs grouped (a model has few kinds), so a step is computed once per kind."""
    cached = model.__dict__.get("_groups")
    if cached is not None and cached[0] == len(model.layers):
        return cached[1]
    groups: dict[tuple, tuple[LayerCost, list[int]]] = {}
    for i, lc in enumerate(model.layers):
        key = astuple(lc)[1:]  # everything but the layer index
        groups.setdefault(key, (lc, []))[1].append(i)
    out = list(groups.values())
    model.__dict__["_groups"] = (len(model.layers), out)
    return out


def _loads(routing, layer: int, expert_nodes):
    """The busiest expert node's load factor of `layer` for each expert-node count (an int or an int array)."""
    if not isinstance(expert_nodes, np.ndarray):
        return routing.load_factor(layer, int(expert_nodes))
    values, index = np.unique(expert_nodes, return_inverse=True)
    return np.array([routing.load_factor(layer, int(v)) for v in values.tolist()])[index.reshape(expert_nodes.shape)]


def disaggregated_step(model: ModelCost, b_a: float, m: int, n_a: int, expert_nodes: int, ctx: float,
                       att: Side, exp: Side, eff: Efficiency, profile: Profile | None = None,
                       routing=None) -> StepTimes:
    """Decode step of the plan: n_a replicas each with m micro-batches of b_a sequences; the same value as
    pipeline_total over the per-layer lists, computed once per layer kind (per layer with a routing profile,
    msc.planner.routing: the busiest expert node sets each layer's expert time). Elementwise over arrays."""
    tokens = b_a * n_a  # one micro-batch across all replicas
    per_node = model.num_experts // expert_nodes
    extra = routing.extra_slots if routing is not None else 0
    last = len(model.layers) - 1
    head = head_time(model, b_a, att, eff)
    sums = [0.0, 0.0, 0.0, 0.0, 0.0]  # t_a, t_e, t_c, t_f, serial
    first = last_f = None
    groups = layer_groups(model) if routing is None else [(lc, [i]) for i, lc in enumerate(model.layers)]
    for lc, idx in groups:
        load = 1.0 if routing is None or not lc.moe else _loads(routing, idx[0], expert_nodes)
        a = attention_layer_time(lc, b_a, ctx, att, eff, model, profile, disaggregated=True)
        e = expert_layer_time(lc, tokens, per_node, exp, eff, model, profile, load, extra)
        c = comm_time(model, b_a, tokens, expert_nodes, att, exp, eff, load, profile) if lc.moe else 0.0
        n = len(idx)
        sums[0] += n * a
        sums[1] += n * e
        sums[2] += n * c
        sums[3] += n * _max(_max(a, e), c)  # the network a stage of its own (pipeline_total's NOTE)
        sums[4] += n * (a + e + 2 * c)
        if idx[0] == 0:
            first = (a + (head if last == 0 else 0.0), e, c)
        if idx[-1] == last:
            last_f = _max(_max(a + head, e), c)
            sums[3] += _max(_max(a + head, e), c) - _max(_max(a, e), c)  # the head runs after the last layer's attention
            sums[0] += head
            sums[4] += head
    t_f0 = _max(_max(first[0], first[1]), first[2])
    piped = (first[0] + first[1] + 2 * first[2]) + m * sums[3] - t_f0
    serial = sums[4] + (m - 1) * last_f
    return StepTimes(sums[0], sums[1], sums[2], _max(piped, serial))


def colocated_step(model: ModelCost, b: float, ctx: float, side: Side, eff: Efficiency,
                   profile: Profile | None = None, routing=None) -> float:
    """Decode step of a colocated instance of side.tp GPUs serving b sequences: attention tensor-parallel,
    experts expert-parallel over the same GPUs, no overlap between the two (what vLLM does without
    dual-batch overlap). With a measured profile (one GPU), the layers' times come from its fits.

    NOTE: two all-reduces a layer (charged in attention_layer_time): after attention, and after the MoE
    block, whose experts each GPU runs for every token of the (replicated) batch, its partial sums summed
    by that all-reduce; no dispatch / combine collectives of their own. Experts split over the GPUs in whole
    experts: with E not a multiple of g the busiest GPU holds ceil(E / g) of them, and its time is the layer's."""
    from msc.planner.routing import busiest_share

    total = head_time(model, b, side, eff)
    g = side.tp
    for i, lc in enumerate(model.layers):
        total += attention_layer_time(lc, b, ctx, side, eff, model, profile)
        if lc.moe and profile is not None:
            total += expert_layer_time(lc, b, lc.experts, side, eff, model, profile)
        elif lc.moe:
            counts = routing.counts(i) if routing is not None else None
            # of the experts (and their tokens), on the busiest GPU: ceil(E / g) / E under uniform routing
            share = busiest_share(counts, g) if counts is not None else math.ceil(lc.experts / g) / lc.experts
            hit = expected_experts_hit(lc.experts, b, model.top_k)
            flops = b * model.top_k * lc.expert_flops_per_token * share
            nbytes = hit * lc.expert_weight_bytes * share
            total += max(flops / (side.flops * eff.flops), nbytes / (side.mem_bw * eff.bandwidth)) + eff.layer_overhead_s
    return total
