"""Layer-template capture: trace one decoder layer of each kind, then repeat it for every layer.

torch.export's cost grows with the number of layers (about 0.2 s per layer on a 2-core machine), yet
the layers of a model come in a few kinds (DeepSeek-V3: dense and MoE; GPT-OSS: sliding and full
attention; Mixtral: one). msc therefore exports a model whose layer list holds one representative of
each kind (plus a second layer of the first kind), and rebuilds the full graph by copying each kind's
block of nodes once per layer, renaming its weights (`model.layers.7.` -> `model.layers.42.`) and the
layer argument of its msc ops.

A layer's kind is a signature of its module tree: classes, parameter shapes and dtypes, and the simple
attributes of every submodule (sliding window, attention type, activation ...), leaving out the layer
number. Two layers with the same signature run the same code on differently named weights.

NOTE: the expansion refuses (TemplateError) whenever the traced graph is not the plain chain it expects
(a block's nodes not contiguous, a block reading a node of a block other than the one before it, blocks
with different numbers of outputs); `capture` then exports the whole model instead, which is always
correct, only slower. The family tests compare both captures on every tested family.
"""
from __future__ import annotations

import re

import torch
import torch.fx as fx
from torch import nn

from msc.ops import MSC_OPS
from msc.ir import fetch_attr

_SKIP_ATTRS = {"layer_idx", "layer_id", "layer_number", "training", "_msc_layer"}


class TemplateError(Exception):
    """The traced graph does not have the layer structure template capture relies on."""


def layer_signature(layer: nn.Module) -> tuple:
    """What makes two decoder layers compute the same thing on different weights."""
    sig = []
    for name, mod in layer.named_modules():
        attrs = []
        for k, v in sorted(vars(mod).items()):
            if k in _SKIP_ATTRS or (k.startswith("_") and not k.startswith("_msc_")):
                continue
            if v is None or isinstance(v, (bool, int, float, str)):
                attrs.append((k, v))
            elif isinstance(v, (tuple, list)) and all(isinstance(x, (bool, int, float, str)) for x in v):
                attrs.append((k, tuple(v)))
        tensors = [(n, tuple(t.shape), str(t.dtype)) for n, t in
                   list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))]
        sig.append((name, type(mod).__qualname__, tuple(attrs), tuple(tensors)))
    return tuple(sig)


def choose_representatives(kinds: list) -> tuple[list[int], dict[int, int]]:
    """(layers to trace, in order; for each layer index, the traced layer whose block it copies).

    Layer 0 copies itself (its block reads the embedding). Every other layer copies a traced layer of its
    kind that has a traced layer before it, so the block's input from its predecessor is known: the
    first layer of each kind, and for layer 0's kind its second layer.
    """
    first: dict = {}
    second: dict = {}
    for i, k in enumerate(kinds):
        if k not in first:
            first[k] = i
        elif k not in second:
            second[k] = i
    chained = {k: (second.get(k) if first[k] == 0 else first[k]) for k in first}
    traced = sorted({0, *(v for v in chained.values() if v is not None)})
    rep_of = {}
    for i, k in enumerate(kinds):
        rep_of[i] = 0 if i == 0 else chained[k]
    return traced, rep_of


def _block_of(n: fx.Node, layers_path: str, layer_re: re.Pattern) -> int | None:
    if n.op == "get_attr":
        m = layer_re.match(n.target)
        return int(m.group(1)) if m else None
    stack = n.meta.get("nn_module_stack") or {}
    for path, _cls in stack.values():
        m = layer_re.match(path.removeprefix("m.") + ".")
        if m:
            return int(m.group(1))
    return None


def expand(gm: fx.GraphModule, full: nn.Module, layers_path: str, traced: list[int], rep_of: dict[int, int],
           num_layers: int, layer_arg: dict[str, int]) -> fx.GraphModule:
    """The full-depth graph from `gm`, traced with only the layers `traced` (keeping their own indices)."""
    layer_re = re.compile(rf"^{re.escape(layers_path)}\.(\d+)\.")
    nodes = list(gm.graph.nodes)
    # NOTE: in the traced graph a layer is named by its position in the shortened layer list, not its index
    pos_of = {r: p for p, r in enumerate(traced)}
    block = {n: (None if (p := _block_of(n, layers_path, layer_re)) is None else traced[p]) for n in nodes}
    calls = [n for n in nodes if n.op not in ("get_attr", "placeholder")]
    # each traced layer's compute nodes are contiguous, in traced order
    order = [block[n] for n in calls if block[n] is not None]
    runs = [b for j, b in enumerate(order) if j == 0 or order[j - 1] != b]
    if runs != traced:
        raise TemplateError(f"layer blocks are not contiguous in traced order ({runs[:8]} vs {traced[:8]})")
    first_pos = next(j for j, n in enumerate(calls) if block[n] is not None)
    last_pos = max(j for j, n in enumerate(calls) if block[n] is not None)
    prefix, suffix = calls[:first_pos], calls[last_pos + 1:]
    blocks = {r: [n for n in calls if block[n] == r] for r in traced}
    pred = {r: (traced[j - 1] if j else None) for j, r in enumerate(traced)}

    def outputs(r: int) -> list[fx.Node]:
        return [n for n in blocks[r] if any(block.get(u) != r for u in n.users)]

    n_out = {len(outputs(r)) for r in traced}
    if len(n_out) != 1:
        raise TemplateError(f"layer blocks have different numbers of outputs ({sorted(n_out)})")
    out_index = {r: {n: j for j, n in enumerate(outputs(r))} for r in traced}

    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}

    def copy(n: fx.Node, mapper) -> fx.Node:
        new = g.node_copy(n, mapper)
        new.meta.update({k: v for k, v in n.meta.items() if k in ("val", "tensor_meta", "nn_module_stack")})
        return new

    for n in nodes:  # placeholders and non-layer weights first, as in the traced graph
        if n.op == "placeholder" or (n.op == "get_attr" and block[n] is None):
            env[n] = copy(n, lambda x: env[x])
    for n in prefix:
        env[n] = copy(n, lambda x: env[x])

    attrs: dict[str, torch.Tensor] = {}
    prev_out: list[fx.Node] | None = None
    for i in range(num_layers):
        r = rep_of[i]
        local: dict[fx.Node, fx.Node] = {}
        rename = (f"{layers_path}.{pos_of[r]}.", f"{layers_path}.{i}.")

        def lookup(x: fx.Node, r=r, local=local, rename=rename) -> fx.Node:
            if x in local:
                return local[x]
            b = block.get(x)
            if b is None:
                return env[x]
            if x.op == "get_attr" and b == r:
                target = rename[1] + x.target[len(rename[0]):]
                if target not in attrs:
                    attrs[target] = full.get_parameter(target) if _is_param(full, target) else full.get_buffer(target)
                local[x] = g.get_attr(target)
                local[x].meta.update({k: v for k, v in x.meta.items() if k in ("val", "tensor_meta")})
                return local[x]
            if b == pred[r] and i > 0 and prev_out is not None:
                return prev_out[out_index[b][x]]
            raise TemplateError(f"layer {r}'s block reads {x.name} of layer {b}")

        for n in blocks[r]:
            new = copy(n, lookup)
            _renumber(new, r, pos_of[r], i, layer_arg, layers_path)
            local[n] = new
        prev_out = [local[n] for n in outputs(r)]
    last = traced[-1]
    for n in suffix:
        def lookup_suffix(x: fx.Node) -> fx.Node:
            b = block.get(x)
            if b is None:
                return env[x]
            if b == last:
                return prev_out[out_index[last][x]]
            raise TemplateError(f"the model's head reads {x.name} of layer {b}")

        env[n] = copy(n, lookup_suffix)
    for n in nodes:
        if n.op == "get_attr" and block[n] is None:
            attrs[n.target] = fetch_attr(gm, n.target)
    g.eliminate_dead_code()
    return fx.GraphModule(attrs, g)


def _is_param(mod: nn.Module, target: str) -> bool:
    owner, _, name = target.rpartition(".")
    return name in mod.get_submodule(owner)._parameters



def _renumber(node: fx.Node, old: int, old_pos: int, new: int, layer_arg: dict[str, int], layers_path: str) -> None:
    """Point a copied msc op at its own layer (the layer argument, and the nn_module_stack paths)."""
    for name, op in MSC_OPS.items():
        if node.op == "call_function" and node.target is op and name in layer_arg:
            k = layer_arg[name]
            if node.args[k] != old:
                raise TemplateError(f"msc::{name} in layer {old}'s block names layer {node.args[k]}")
            args = list(node.args)
            args[k] = new
            node.args = tuple(args)
    stack = node.meta.get("nn_module_stack")
    if stack:
        node.meta["nn_module_stack"] = {
            key: (re.sub(rf"{re.escape(layers_path)}\.{old_pos}(?=\.|$)", f"{layers_path}.{new}", path, count=1), cls)
            for key, (path, cls) in stack.items()
        }
