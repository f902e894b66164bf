"""Capture: a transformers MoE model -> a shape-generic torch.fx GraphModule, on the meta device.

The family adapter routes attention, routers and experts through msc ops; torch.export (non-strict)
then traces the model's own forward with fake tensors. Parameters become get_attr nodes named by
their module path (the names the weight map uses); non-persistent buffers (rotary tables) are
computed on the CPU and kept as small constants.

Graph inputs: input_ids [1, T] and position_ids [1, T] (all sequences of a step packed along T);
output: logits [1, T, V].
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from msc.errors import MscError
from msc.ir import fetch_attr, graph_meta, node_meta
from msc.models import state_mixers
from msc.models.base import IMPL, FamilyAdapter
from msc.ops import MSC_OPS, STATE_OPS

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LAYER_ARG = {"attention": 3, "mla_attention": 4, "router": 3, "experts": 5, "causal_conv1d": 3, "gated_delta_rule": 5,
              "mamba2_scan": 7, "mamba_scan": 8, "linear_attention": 4,
              "dsa_index": 3}


@dataclass
class Captured:
    gm: fx.GraphModule
    constants: dict[str, torch.Tensor]  # non-persistent buffers, computed on CPU
    num_moe_layers: int
    seconds: float


class _LogitsOnly(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.m = model

    def forward(self, input_ids, position_ids):
        return self.m(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


def build_meta_model(config, dtype: torch.dtype) -> nn.Module:
    """The transformers model on the meta device (no weights in memory), using msc's implementations."""
    import copy

    from transformers import AutoModelForCausalLM

    # NOTE: from_config records the implementations on the config it is given; a copy keeps a caller's
    # config (and any live model sharing it) on its own attention and experts implementations.
    config = copy.deepcopy(config)
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(
                config, dtype=dtype, attn_implementation=IMPL, experts_implementation=IMPL
            )
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise MscError(f"transformers could not build model_type '{config.model_type}': {e}") from None


def _buffers_on_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    """Non-persistent buffers (not in checkpoints) recomputed on CPU with the model's own initialiser."""
    out = {}
    for mod_name, mod in model.named_modules():
        # persistent buffers (e.g. DeepSeek-V3's router correction bias) are in the checkpoint like weights
        own = {b: t for b, t in mod.named_buffers(recurse=False) if b in mod._non_persistent_buffers_set}
        if not own:
            continue
        if any(True for _ in mod.parameters(recurse=False)):
            # NOTE: a module with weights (Gemma 4's scaled embedding) keeps them on meta: only its buffers come
            # to the CPU, so a full-size embedding is never materialised here
            for b, t in own.items():
                mod._buffers[b] = torch.empty_like(t, device="cpu")
        else:
            mod.to_empty(device="cpu", recurse=False)
        for b in own:  # NaN first: a buffer the initialiser leaves alone is caught below, never used as garbage
            if mod._buffers[b].is_floating_point():
                mod._buffers[b].fill_(float("nan"))
        model._init_weights(mod)
        for b, t in mod.named_buffers(recurse=False):
            if b in own:
                if t.is_floating_point() and torch.isnan(t).any():
                    raise MscError(f"module '{mod_name}' ({type(mod).__name__}): its buffer '{b}' is not set by the "
                                   "model's initialiser, so msc cannot rebuild it")
                out[f"{mod_name}.{b}" if mod_name else b] = t.detach().clone()
    return out


def capture(config, adapter: FamilyAdapter, dtype: str = "float32", template: bool = True) -> Captured:
    """Capture the model of `config`. template: trace one layer per kind and repeat it (msc.layer_template),
    falling back to tracing every layer when the graph does not allow it."""
    t0 = time.perf_counter()
    model = build_meta_model(config, DTYPES[dtype]).eval()
    num_moe = adapter.prepare(model)
    gm = None
    with state_mixers.capturing(model):
        if template:
            gm = _capture_by_template(model)
        if gm is None:
            gm = _unlift(_export(model))
    constants = _buffers_on_cpu(model)
    for n in gm.graph.nodes:
        for name, op in MSC_OPS.items():
            if n.op == "call_function" and n.target is op and name in _LAYER_ARG:
                node_meta(n)["layer"] = int(n.args[_LAYER_ARG[name]])
    _check_every_layer_attends(model, gm)
    _check_one_cache_layout(gm)
    graph_meta(gm)["capture"] = {"model_class": type(model).__name__, "num_moe_layers": num_moe,
                                 "template": graph_meta(gm).get("template")}
    return Captured(gm, constants, num_moe, time.perf_counter() - t0)


def _check_every_layer_attends(model: nn.Module, gm) -> None:
    """Refuse a model whose decoder layers mix tokens some other way than attention or a known state mixer (a
    short convolution, a recurrent or linear-attention state msc does not implement): that state would live
    outside the runtime's caches, so the compiled program would decode wrongly after the first steps (issue 26).
    A known state mixer (msc.models.state_mixers.KNOWN_MIXERS) must have made exactly the msc ops it is known
    to make.

    NOTE: checked on the captured graph: every decoder layer must call msc::attention (or MLA) or state ops."""
    from msc.models.generic import decoder_layers

    try:
        layers = decoder_layers(model)
    except MscError:
        return  # no recognisable layer list: the adapter's own checks apply
    attending = {int(n.args[_LAYER_ARG[name]]) for n in gm.graph.nodes for name in ("attention", "mla_attention")
                 if n.op == "call_function" and n.target is MSC_OPS[name]}
    made: dict[int, dict[str, int]] = {}
    for n in gm.graph.nodes:
        for name in STATE_OPS:
            if n.op == "call_function" and n.target is MSC_OPS[name]:
                per = made.setdefault(int(n.args[_LAYER_ARG[name]]), {})
                per[name] = per.get(name, 0) + 1
    path = next((name for name, mod in model.named_modules() if mod is layers), "layers")
    for i, layer in enumerate(layers):
        mixers = [m for m in layer.modules() if type(m).__name__ in state_mixers.KNOWN_MIXERS]
        want: dict[str, int] = {}
        for m in mixers:
            for op, c in state_mixers.KNOWN_MIXERS[type(m).__name__].items():
                want[op] = want.get(op, 0) + c
        if made.get(i, {}) != want:
            raise MscError(f"{path}.{i} ({type(layer).__name__}) made state ops {made.get(i, {})} where its mixers "
                           f"({', '.join(type(m).__name__ for m in mixers) or 'none'}) make {want}; msc refuses a state "
                           "layer it did not capture whole")
    missing = [i for i in range(len(layers)) if i not in attending and i not in made and not _position_wise(layers[i])]
    if not missing:
        return
    i = missing[0]
    parts = ", ".join(sorted({type(m).__name__ for m in layers[i].children()}))
    raise MscError(f"{path}.{i} ({type(layers[i]).__name__}: {parts}) mixes tokens without attention or a state mixer "
                   f"msc knows; {len(missing)} of {len(layers)} decoder layers do (layers {missing[:8]}"
                   f"{' ...' if len(missing) > 8 else ''}). Their state (a convolution or recurrent state) would live "
                   "outside msc's KV and state caches, so msc refuses the model rather than compile one that decodes "
                   f"wrongly (state mixers msc implements: {', '.join(state_mixers.KNOWN_MIXERS)})")


# NOTE: module kinds that compute each token on its own (no token mixing): a decoder layer made only of these
# (Nemotron-H's MoE and MLP layers) needs neither attention nor a state. Anything else in a layer without
# attention or a known state mixer is refused.
_POSITION_WISE = re.compile(r"Norm|MLP|MoE|Moe|Experts|Router|Gate|TopK|Topk|FeedForward|Block$|DecoderLayer$|Activation")


def _position_wise(layer: nn.Module) -> bool:
    """Whether every module of a decoder layer is of a kind that computes each token on its own."""
    plain = (nn.Linear, nn.Dropout, nn.Identity, nn.SiLU, nn.GELU, nn.ReLU, nn.Sigmoid, nn.Tanh)
    return all(isinstance(m, plain) or _POSITION_WISE.search(type(m).__name__) for m in layer.modules())


def cache_layout(node) -> tuple:
    """What one attention call keeps per token in the KV cache: ("kv", heads, key width, value width) or
    ("latent", r + dr, r) for MLA, from the captured node's argument shapes."""
    val = lambda i: node.args[i].meta["val"]  # noqa: E731
    if node.target is MSC_OPS["mla_attention"]:
        return ("latent", int(val(1).shape[-1] + val(2).shape[-1]), int(val(1).shape[-1]))
    return ("kv", int(val(1).shape[1]), int(val(1).shape[-1]), int(val(2).shape[-1]))


def _check_one_cache_layout(gm) -> None:
    """Refuse a model whose layers keep differently shaped K/V (other head counts or widths per layer type):
    the runtime's paged cache holds one shape for every layer, so such a model would fail (or worse) at run
    time."""
    layouts = {}
    for n in gm.graph.nodes:
        for name in ("attention", "mla_attention"):
            if n.op == "call_function" and n.target is MSC_OPS[name] and all("val" in getattr(a, "meta", {}) for a in n.args[1:3]):
                layouts.setdefault(cache_layout(n), []).append(int(n.args[_LAYER_ARG[name]]))
    if len(layouts) > 1:
        desc = "; ".join(f"layers {sorted(ls)[:6]}{' ...' if len(ls) > 6 else ''}: {lay}" for lay, ls in layouts.items())
        raise MscError(f"the model's layers keep differently shaped keys and values ({desc}); msc's KV cache holds one "
                       "shape for every layer, so it refuses the model rather than run it wrongly")


def _export(model: nn.Module, dynamic: bool = True) -> torch.export.ExportedProgram:
    """dynamic: the token count T symbolic (the graph runs at any T); else fixed at the example's."""
    wrapper = _LogitsOnly(model)
    tokens = torch.export.Dim("T", min=2, max=1 << 20)
    ids = torch.zeros(1, 5, dtype=torch.long, device="meta")
    shapes = ({1: tokens}, {1: tokens}) if dynamic else None
    try:
        # NOTE: captured for inference: under no_grad, a custom autograd.Function (PhiMoE's sparsemixer
        # router) is traced through its forward instead of becoming a higher-order op with subgraphs.
        with torch.no_grad():
            return torch.export.export(wrapper, (ids, ids.clone()), dynamic_shapes=shapes, strict=False)
    except Exception as e:  # export errors are long; keep the first line and name the model
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MscError(f"torch.export could not capture {type(model).__name__}: {first}") from e


def _layer_kinds(model: nn.Module) -> tuple[nn.ModuleList, str, list, list[int], dict[int, int]] | None:
    """(decoder layers, their module path, their kinds, the layers to trace, each layer's representative) of
    msc.layer_template; None when the model has no recognisable layer list."""
    from msc.layer_template import choose_representatives, layer_signature
    from msc.models.generic import decoder_layers

    try:
        layers = decoder_layers(model)
    except MscError:
        return None
    path = next(name for name, mod in model.named_modules() if mod is layers)
    kinds = [layer_signature(layer) for layer in layers]
    traced, rep_of = choose_representatives(kinds)
    return layers, path, kinds, traced, rep_of


def _export_layers(model: nn.Module, layers: nn.ModuleList, path: str, traced: list[int], dynamic: bool = True) -> fx.GraphModule:
    """The graph of the model with only the layers `traced` (named by their position in that list)."""
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    setattr(parent, attr, nn.ModuleList([layers[i] for i in traced]))
    try:
        return _unlift(_export(model, dynamic))
    finally:
        setattr(parent, attr, layers)


def _capture_by_template(model: nn.Module) -> fx.GraphModule | None:
    """Export with one layer per kind and expand (see msc.layer_template); None when that does not apply."""
    from msc.layer_template import TemplateError, expand

    found = _layer_kinds(model)
    if found is None:
        return None
    layers, path, kinds, traced, rep_of = found
    if len(traced) >= len(layers):
        return None
    traced_gm = _export_layers(model, layers, path, traced)
    try:
        gm = expand(traced_gm, model, path, traced, rep_of, len(layers), _LAYER_ARG)
    except TemplateError as e:
        log.info("layer-template capture does not apply (%s); exporting every layer", e)
        return None
    graph_meta(gm)["template"] = {"traced_layers": traced, "kinds": len(set(kinds))}
    return gm


@dataclass
class LayerKinds:
    """What the planner's cost model reads (msc.planner.cost.model_cost_of_kinds)."""

    gm: fx.GraphModule  # the model with one layer per kind, its weights named by their own layer's index
    constants: set[str]  # names of the non-persistent buffers (computed, not weights)
    rep_of: dict[int, int] | None  # every layer -> the layer in gm that computes like it; None: gm has every layer
    seconds: float


def capture_layer_kinds(config, adapter: FamilyAdapter, dtype: str = "float32") -> LayerKinds:
    """The planner's capture: the model with one layer per kind, traced at a fixed token count (make_fx over
    fake tensors, not torch.export). What a cost reads (weights, the head counts and widths at msc::attention,
    the stacked experts) depends on neither, and layers of one kind cost the same
    (msc.planner.cost.model_cost_of_kinds; tested equal to the compiled graph's costs on every family).
    `msc compile` always uses `capture`."""
    t0 = time.perf_counter()
    model = build_meta_model(config, DTYPES[dtype]).eval()
    adapter.prepare(model)
    found = _layer_kinds(model)
    rep_of = None
    if found is not None:
        # NOTE: a layer's cost depends only on its kind, so one layer of each kind is traced: the first. (The
        # layer template of `capture` also traces layer 0's successor, to know how one block feeds the next;
        # costs do not need that.)
        layers, path, kinds, _, _ = found
        first: dict = {}
        for i, k in enumerate(kinds):
            first.setdefault(k, i)
        traced, rep_of = sorted(first.values()), {i: first[k] for i, k in enumerate(kinds)}
        if len(traced) >= len(layers):
            rep_of = None
    if rep_of is not None:
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        setattr(parent, attr, nn.ModuleList([layers[i] for i in traced]))
        try:
            with state_mixers.capturing(model):
                gm = _trace_for_costs(model)
        finally:
            setattr(parent, attr, layers)
        # NOTE: in the shortened layer list a weight is named by its position; the cost model reads the layer
        # of a weight from its name, so name it by its own layer again (model.layers.1. -> model.layers.3.)
        layer_re = re.compile(rf"^{re.escape(path)}\.(\d+)\.")
        attrs = {}
        for n in gm.graph.nodes:
            if n.op == "get_attr":
                t = fetch_attr(gm, n.target)
                n.target = layer_re.sub(lambda m: f"{path}.{traced[int(m.group(1))]}.", n.target, count=1)
                attrs[n.target] = t
        gm = fx.GraphModule(attrs, gm.graph)
    else:
        with state_mixers.capturing(model):
            gm = _trace_for_costs(model)
    constants = set(_buffers_on_cpu(model))
    return LayerKinds(gm, constants, rep_of, time.perf_counter() - t0)


def _trace_for_costs(model: nn.Module) -> fx.GraphModule:
    """The model's forward at a fixed token count as an aten graph whose weights are get_attr nodes named by
    module path, like `_unlift(_export(model, dynamic=False))` gives, for the planner's cost model.

    NOTE: make_fx over fake tensors instead of torch.export: the cost model reads only shapes, weights and
    the msc ops, which both give alike, and a cold `msc plan` then never imports torch.export's tracing
    machinery (aot_autograd and what it pulls in: ~0.5 s of a ~5 s plan on 2 cores). Fake tensors also keep
    transformers' data-dependent checks (packed-sequence detection) on their tracing branch."""
    from torch.func import functional_call
    from torch.fx.experimental.proxy_tensor import make_fx

    wrapper = _LogitsOnly(model)
    named = {**dict(wrapper.named_parameters()), **dict(wrapper.named_buffers())}  # shared tensors once
    names = list(named)

    def forward(tensors, input_ids, position_ids):
        return functional_call(wrapper, dict(zip(names, tensors)), (input_ids, position_ids))

    ids = torch.zeros(1, 5, dtype=torch.long, device="meta")
    try:
        with torch.no_grad():  # see _export: custom autograd.Functions are traced through their forward
            traced = make_fx(forward, tracing_mode="fake")(list(named.values()), ids, ids.clone())
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MscError(f"could not trace {type(model).__name__} for the planner: {first}") from e
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    weights = dict(zip(placeholders, names))  # the flattened tensor list comes first, in order
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    attrs: dict[str, torch.Tensor] = {}
    for n in traced.graph.nodes:
        if n in weights:
            fqn = weights[n].removeprefix("m.")
            attrs[fqn] = named[weights[n]]
            new = g.get_attr(fqn)
        else:
            new = g.node_copy(n, lambda x: env[x])
        new.meta.update({k: v for k, v in n.meta.items() if k in ("val", "tensor_meta")})
        env[n] = new
    g.eliminate_dead_code()
    return fx.GraphModule(attrs, g)


def _unlift(ep: torch.export.ExportedProgram) -> fx.GraphModule:
    """Turn export's lifted parameter/buffer placeholders into get_attr nodes named by module path."""
    sig = ep.graph_signature
    lifted = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    if sig.inputs_to_lifted_tensor_constants:
        raise MscError("captured graph has tensor constants; msc cannot store them yet")
    src = ep.graph_module.graph
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    attrs: dict[str, torch.Tensor] = {}
    state = {**ep.state_dict, **ep.constants}
    for n in src.nodes:
        if n.op == "placeholder" and n.name in lifted:
            fqn = lifted[n.name].removeprefix("m.")
            attrs[fqn] = state[lifted[n.name]]
            new = g.get_attr(fqn)
        elif n.op == "call_function" and n.target is torch.ops.aten._assert_tensor_metadata.default:
            continue  # export's dtype/device checks are tied to the capture device (meta)
        else:
            new = g.node_copy(n, lambda x: env[x])
        new.meta.update({k: v for k, v in n.meta.items() if k in ("val", "tensor_meta", "nn_module_stack")})
        env[n] = new
    g.eliminate_dead_code()
    gm = fx.GraphModule(attrs, g)
    return gm
