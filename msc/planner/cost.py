"""Cost model: FLOPs and bytes per token of each layer, read off the captured graph.

Nothing here is typed in per model. The captured graph (msc.capture, on the meta device) says everything:
- every `aten.linear` / `mm` / `matmul` whose weight is a parameter costs 2·numel(weight) FLOPs per token
  and reads the weight's bytes once per forward; those outside `msc::experts` run on the attention side
  (projections, routers, shared experts, dense MLPs, the head);
- `msc::attention` gives the head counts and widths from its q, k, v shapes ([1, heads, T, d]): the core
  costs 2·nh·(dk + dv) FLOPs per token per context position, and the KV cache holds nkv·(dk + dv) values per
  token per layer; a sliding window caps the positions the core reads;
- `msc::mla_attention` (MLA, the runtime's latent cache: msc.runtime.paged_kv.paged_mla_attention) keeps
  r + dr values per token per layer in one head shared by all (every tensor-parallel rank holds all of it);
  its core, with W_k absorbed into the query, costs 2·nh·(2r + dr) FLOPs per context position, and the
  absorption and the value projection 2·numel(kv_b) per token;
- `msc::experts` gives the stacked expert weights [E, ...]: each routed token costs 2·(numel(gate_up) +
  numel(down))/E FLOPs on its expert, and an expert's bytes are read once per forward when any token hits it.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from msc import env as msc_env
from msc.errors import MscError

if TYPE_CHECKING:  # NOTE: torch is imported only when a graph is read, so a cached cost model plans without it
    import torch.fx as fx

_MATMULS = {"aten.linear.default", "aten.mm.default", "aten.matmul.default", "aten.addmm.default"}
# ops a weight may pass through on its way to a matmul (DeepSeek's router: F.linear(x.float(), w.float()))
_PASS_THROUGH = {"aten.to.dtype", "aten._to_copy.default", "aten.to.dtype_layout", "aten.t.default",
                 "aten.transpose.int", "aten.permute.default", "aten.contiguous.default"}


def _weight_of(arg):
    """The get_attr node an operand comes from, through casts and transposes; None for activations."""
    import torch.fx as fx

    while isinstance(arg, fx.Node):
        if arg.op == "get_attr":
            return arg
        if arg.op != "call_function" or str(arg.target) not in _PASS_THROUGH:
            return None
        arg = arg.args[0]
    return None


@dataclass
class LayerCost:
    layer: int
    attn_weight_bytes: int = 0  # attention-side weights of this layer (projections, norms, router, shared/dense MLP)
    attn_flops_per_token: float = 0.0  # attention-side matmul FLOPs per token, without the attention core
    core_flops_per_token_ctx: float = 0.0  # attention core FLOPs per token per context position
    kv_bytes_per_token: int = 0  # KV-cache bytes this layer keeps per token of context
    kv_heads: int = 0  # key/value heads of its cache (0: unknown); tp beyond them replicates heads
    state_bytes_per_seq: int = 0  # a state layer's per-sequence state (conv window, recurrent matrix), read and
    #                               written once a decode step; every tensor-parallel rank keeps all of it
    window: int = -1  # sliding window (-1: full attention)
    experts: int = 0  # routed experts in this layer (0: dense layer, no expert side)
    expert_weight_bytes: int = 0  # bytes of ONE expert's weights
    expert_flops_per_token: float = 0.0  # FLOPs of one routed (token, expert) pair

    @property
    def moe(self) -> bool:
        return self.experts > 0


@dataclass
class ModelCost:
    """Per-layer costs plus what sits outside the layers (embedding, final norm, head)."""

    layers: list[LayerCost]
    top_k: int
    hidden_size: int
    dtype_bytes: int
    other_weight_bytes: int = 0
    other_flops_per_token: float = 0.0

    # NOTE: the totals below are asked for on every step evaluation of a search (tens of thousands);
    # they are computed once per layer list (the key notices a changed list length) and kept.
    def _total(self, name: str, fn):
        key = (name, len(self.layers), self.other_weight_bytes)
        cache = self.__dict__.setdefault("_totals", {})
        if key not in cache:
            cache[key] = fn()
        return cache[key]

    @property
    def num_experts(self) -> int:
        return self._total("experts", lambda: max((lc.experts for lc in self.layers), default=0))

    def attention_weight_bytes(self) -> int:
        return self._total("attn", lambda: self.other_weight_bytes + sum(lc.attn_weight_bytes for lc in self.layers))

    def expert_weight_bytes(self) -> int:
        return self._total("exp", lambda: sum(lc.expert_weight_bytes * lc.experts for lc in self.layers))

    def kv_bytes_tp(self, tp: int) -> float:
        """KV-cache bytes per token of context summed over tp attention GPUs (divide by tp for one GPU).

        NOTE: as compiled (passes/shard_tensor_parallel.py): tp up to a layer's KV heads splits them; beyond,
        each head is replicated on tp / heads ranks, so the tp GPUs together hold tp / heads copies."""
        if not any(0 < lc.kv_heads < tp for lc in self.layers):
            return self.kv_bytes_per_token()
        return sum(lc.kv_bytes_per_token * tp / lc.kv_heads if 0 < lc.kv_heads < tp else lc.kv_bytes_per_token
                   for lc in self.layers)

    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes per token of context, summed over layers (msc's cache keeps every position)."""
        return self._total("kv", lambda: sum(lc.kv_bytes_per_token for lc in self.layers))

    def state_bytes_per_seq(self) -> int:
        """The state layers' per-sequence state bytes, summed over layers (one GPU's, whatever its tp)."""
        return self._total("state", lambda: sum(lc.state_bytes_per_seq for lc in self.layers))

    def to_dict(self) -> dict:
        return asdict(self)


def _nbytes(t) -> int:
    return t.numel() * t.element_size()



def model_cost(gm: "fx.GraphModule", top_k: int, constants=()) -> ModelCost:
    """Costs of the captured graph `gm` (before the passes). constants: computed buffers, not weights."""
    import torch.fx as fx

    from msc.inspect import layer_of
    from msc.ir import fetch_attr
    from msc.ops import is_op

    layers: dict[int, LayerCost] = {}
    other_bytes, other_flops, dtype_bytes, hidden = 0, 0.0, None, None
    expert_params: set[str] = set()

    def lc(i: int) -> LayerCost:
        return layers.setdefault(i, LayerCost(i))

    for n in gm.graph.nodes:
        if is_op(n, "experts"):
            gate_up, down = fetch_attr(gm, n.args[3].target), fetch_attr(gm, n.args[4].target)
            e = gate_up.shape[0]
            c = lc(int(n.args[5]))
            c.experts = e
            per = (gate_up.numel() + down.numel()) // e
            extra = sum(fetch_attr(gm, a.target).numel() // e for a in n.args[7:9] if isinstance(a, fx.Node))  # biases
            c.expert_weight_bytes = (per + extra) * gate_up.element_size()
            c.expert_flops_per_token = 2.0 * per
            expert_params.update(a.target for a in n.args if isinstance(a, fx.Node) and a.op == "get_attr")
            hidden = hidden or int(n.args[0].meta["val"].shape[-1])
        elif is_op(n, "attention"):
            q, k, v = (a.meta["val"].shape for a in n.args[:3])  # [1, heads, T, d]
            c = lc(int(n.args[3]))
            nh, nkv, dk, dv = int(q[1]), int(k[1]), int(k[-1]), int(v[-1])
            dtype_bytes = n.args[0].meta["val"].element_size()
            c.core_flops_per_token_ctx = 2.0 * nh * (dk + dv)
            c.kv_bytes_per_token = nkv * (dk + dv) * dtype_bytes
            c.kv_heads = nkv
            c.window = int(n.args[5])
        elif is_op(n, "mla_attention"):
            q, lat, rot = (a.meta["val"].shape for a in n.args[:3])  # [1, nh, T, dn + dr], [1, 1, T, r], [1, 1, T, dr]
            c = lc(int(n.args[4]))
            nh, r, dr = int(q[1]), int(lat[-1]), int(rot[-1])
            dtype_bytes = n.args[0].meta["val"].element_size()
            c.core_flops_per_token_ctx = 2.0 * nh * (2 * r + dr)
            c.attn_flops_per_token += 2.0 * fetch_attr(gm, n.args[3].target).numel()  # W_k absorbed, W_v applied
            c.kv_bytes_per_token += (r + dr) * dtype_bytes
            c.kv_heads = 1
            c.window = int(n.args[6])
        elif is_op(n, "dsa_index"):  # k [1, T, D]: DeepSeek sparse attention's indexer key, cached per token
            k = n.args[1].meta["val"]
            c = lc(int(n.args[3]))
            c.kv_bytes_per_token += int(k.shape[-1]) * k.element_size()
            q = n.args[0].meta["val"]  # [1, T, Hi, D]: its scores read every cached key of the sequence
            c.core_flops_per_token_ctx += 2.0 * int(q.shape[2]) * int(q.shape[3])
        elif is_op(n, "causal_conv1d"):  # x [1, C, T], weight [C, K]: the last K - 1 inputs kept
            x, w = n.args[0].meta["val"], n.args[1].meta["val"]
            lc(int(n.args[3])).state_bytes_per_seq += int(x.shape[1]) * (int(w.shape[-1]) - 1) * x.element_size()
            lc(int(n.args[3])).attn_flops_per_token += 2.0 * w.numel()
        elif is_op(n, "gated_delta_rule"):  # k [1, T, Hk, dk], v [1, T, Hv, dv]: S [Hv, dk, dv] in float32
            k, v = n.args[1].meta["val"], n.args[2].meta["val"]
            hv, dk, dv = int(v.shape[2]), int(k.shape[3]), int(v.shape[3])
            lc(int(n.args[5])).state_bytes_per_seq += hv * dk * dv * 4
            lc(int(n.args[5])).attn_flops_per_token += 8.0 * hv * dk * dv  # decay, predict, update, read
        elif is_op(n, "linear_attention"):  # k [1, T, H, dk], v [1, T, H, dv]: S [H, dk, dv] in float32
            k, v = n.args[1].meta["val"], n.args[2].meta["val"]
            size = int(v.shape[2]) * int(k.shape[3]) * int(v.shape[3])
            lc(int(n.args[4])).state_bytes_per_seq += size * 4
            lc(int(n.args[4])).attn_flops_per_token += 6.0 * size
        elif is_op(n, "mamba2_scan"):  # h [heads, P, N] in float32
            x, b = n.args[0].meta["val"], n.args[1].meta["val"]
            heads, groups = int(n.args[8]), int(n.args[9])
            size = heads * (int(x.shape[-1]) // heads) * (int(b.shape[-1]) // groups)
            lc(int(n.args[7])).state_bytes_per_seq += size * 4
            lc(int(n.args[7])).attn_flops_per_token += 6.0 * size
        elif is_op(n, "mamba_scan"):  # h [I, N] in float32
            size = n.args[5].meta["val"].numel()
            lc(int(n.args[8])).state_bytes_per_seq += size * 4
            lc(int(n.args[8])).attn_flops_per_token += 6.0 * size
        elif is_op(n, "router"):  # Mixtral's swapped router: [T, H] @ [E, H]ᵀ
            w = n.args[1]
            lc(int(n.args[3])).attn_flops_per_token += 2.0 * fetch_attr(gm, w.target).numel()
        elif n.op == "call_function" and str(n.target) in _MATMULS:
            operands = n.args[1:3] if str(n.target) == "aten.addmm.default" else n.args[:2]  # addmm(bias, x, wᵀ)
            w = next((w for w in map(_weight_of, operands) if w is not None), None)
            if w is not None:
                flops = 2.0 * fetch_attr(gm, w.target).numel()
                i = layer_of(w.target)
                if i is None:
                    other_flops += flops
                else:
                    lc(i).attn_flops_per_token += flops
    for n in gm.graph.nodes:
        if n.op != "get_attr" or n.target in expert_params or n.target in constants:
            continue
        t = fetch_attr(gm, n.target)
        i = layer_of(n.target)
        if i is None:
            other_bytes += _nbytes(t)
        else:
            lc(i).attn_weight_bytes += _nbytes(t)
    if not layers or not any(c.moe for c in layers.values()):
        raise MscError("the captured graph has no msc::experts node: nothing for the planner to place")
    if dtype_bytes is None:
        raise MscError("the captured graph has no msc::attention node: the planner needs the attention's shapes")
    ordered = [layers[i] for i in sorted(layers)]
    return ModelCost(ordered, top_k=top_k, hidden_size=hidden, dtype_bytes=dtype_bytes,
                     other_weight_bytes=other_bytes, other_flops_per_token=other_flops)


def model_cost_of_kinds(kinds, top_k: int) -> ModelCost:
    """Costs from msc.capture.capture_layer_kinds: model_cost of its graph, whose layers are one per kind, each
    layer then costing what its kind's traced layer costs (they run the same code on weights of equal shapes)."""
    cost = model_cost(kinds.gm, top_k, kinds.constants)
    if kinds.rep_of is not None:
        traced = {lc.layer: lc for lc in cost.layers}
        cost.layers = [replace(traced[r], layer=i) for i, r in sorted(kinds.rep_of.items()) if r in traced]
    return cost


def _cache_path(spec) -> Path | None:
    """Where the cost model of this spec's model is cached: keyed by the model's config, its dtype and the
    versions of msc, torch and transformers (which decide what the captured graph holds)."""
    if msc_env.switch("MSC_NO_CACHE"):
        return None
    if spec.model.config is not None:
        model = spec.model.config
    else:
        cfg = Path(spec.model.path) / "config.json"
        if not cfg.is_file():
            return None
        model = json.loads(cfg.read_text())
    versions = {}
    for pkg in ("msc", "torch", "transformers"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "?"
    key = json.dumps({"model": model, "dtype": spec.model.dtype, "versions": versions, "format": 2}, sort_keys=True)
    return msc_env.cache_dir() / "costs" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def _from_dict(d: dict) -> ModelCost:
    d = dict(d)
    d["layers"] = [LayerCost(**lc) for lc in d["layers"]]
    return ModelCost(**d)


def cost_of_spec(spec, use_cache: bool = True) -> tuple[ModelCost, dict]:
    """Capture the spec's model on the meta device (one layer per kind: msc.capture.capture_layer_kinds) and
    derive its costs; also returns the MoE shape.

    NOTE: the result is cached (MSC_CACHE_DIR, default ~/.cache/msc; MSC_NO_CACHE=1 turns it off): a cost
    model depends only on the config, dtype and library versions, and capture is most of a plan's time."""
    path = _cache_path(spec) if use_cache else None
    if path is not None and path.is_file():
        try:
            d = json.loads(path.read_text())
            if "max_position_embeddings" in d["moe"]:  # else an entry from before that key: recomputed
                return _from_dict(d["cost"]), d["moe"]
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # a damaged cache entry is recomputed and rewritten
    from msc.capture import capture_layer_kinds
    from msc.compiler import load_hf_config
    from msc.models.registry import adapter_for

    hf_config = load_hf_config(spec)
    adapter = adapter_for(hf_config.model_type, hf_config)
    moe = dict(adapter.moe_shape(hf_config))
    moe["max_position_embeddings"] = getattr(hf_config, "max_position_embeddings", None)  # for msc plan's checks
    cost = model_cost_of_kinds(capture_layer_kinds(hf_config, adapter, spec.model.dtype), moe["top_k"])
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"cost": cost.to_dict(), "moe": moe}))
            tmp.replace(path)
        except OSError:
            pass  # an unwritable cache only costs time
    return cost, moe


def attention_core_positions(ctx: float, window: int) -> float:
    """Context positions the attention core reads for one token at context length ctx."""
    return ctx if window is None or window < 0 else min(ctx, float(window))

