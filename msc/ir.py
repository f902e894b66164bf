"""IR conventions on top of torch.fx, and the JSON form of a program stored in a bundle.

- `node.meta["msc"]`: {"role": "attention"|"expert", "layer": int, ...}
- `gm.meta["msc"]`: {"spec": ..., "plan": ..., "passes": [provenance...], "roles": {...}, ...}

A program is stored as JSON (no pickle): its nodes with targets named by their qualified op names,
arguments with node references, and get_attr targets that name entries of the role's weight map.
Device arguments are stored as a marker and bound to the role's device when the program is loaded.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

import msc.ops  # noqa: F401  (registers the msc op namespace)

ROLE_ATTENTION = "attention"
ROLE_EXPERT = "expert"
FORMAT_VERSION = 1


def node_meta(node: fx.Node) -> dict:
    return node.meta.setdefault("msc", {})


def graph_meta(gm: fx.GraphModule) -> dict:
    return gm.meta.setdefault("msc", {})


# ---------------------------------------------------------------------------------------------- targets
_BUILTINS = {f"operator.{n}": getattr(operator, n) for n in ("getitem", "add", "sub", "mul", "floordiv", "truediv", "neg", "mod", "eq", "ne", "lt", "le", "gt", "ge")}


def target_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"torch.ops.{target.namespace}.{target._opname}.{target._overloadname}"
    for name, fn in _BUILTINS.items():
        if target is fn:
            return name
    if isinstance(target, str):
        return target
    raise ValueError(f"cannot store call target {target!r} in a program")


def resolve_target(name: str) -> Any:
    if name in _BUILTINS:
        return _BUILTINS[name]
    if name.startswith("torch.ops."):
        _, _, ns, op, overload = name.split(".")
        return getattr(getattr(getattr(torch.ops, ns), op), overload)
    raise ValueError(f"unknown call target '{name}' in stored program")


# ---------------------------------------------------------------------------------------------- args
def _enc(a: Any) -> Any:
    if isinstance(a, fx.Node):
        return {"$node": a.name}
    if a is None or isinstance(a, (bool, int, float, str)):
        return a
    if isinstance(a, (list, tuple)):
        return {"$list" if isinstance(a, list) else "$tuple": [_enc(x) for x in a]}
    if isinstance(a, torch.dtype):
        return {"$dtype": str(a).removeprefix("torch.")}
    if isinstance(a, torch.device):
        return {"$device": "role"}
    if isinstance(a, torch.layout):
        return {"$layout": str(a).removeprefix("torch.")}
    if isinstance(a, torch.memory_format):
        return {"$memory_format": str(a).removeprefix("torch.")}
    if isinstance(a, slice):
        return {"$slice": [_enc(a.start), _enc(a.stop), _enc(a.step)]}
    raise ValueError(f"cannot store argument {a!r} of type {type(a).__name__} in a program")


def _dec(a: Any, env: dict[str, fx.Node], device: torch.device) -> Any:
    if not isinstance(a, dict):
        return a
    (kind, v), = a.items()
    if kind == "$node":
        return env[v]
    if kind == "$list":
        return [_dec(x, env, device) for x in v]
    if kind == "$tuple":
        return tuple(_dec(x, env, device) for x in v)
    if kind == "$dtype":
        return getattr(torch, v)
    if kind == "$device":
        return device
    if kind == "$layout":
        return getattr(torch, v)
    if kind == "$memory_format":
        return getattr(torch, v)
    if kind == "$slice":
        return slice(*(_dec(x, env, device) for x in v))
    raise ValueError(f"unknown argument encoding {kind}")


_KEEP_META = ("msc",)


def graph_to_json(graph: fx.Graph) -> dict:
    nodes = []
    for n in graph.nodes:
        entry = {
            "name": n.name,
            "op": n.op,
            "target": target_name(n.target) if n.op == "call_function" else n.target,
            "args": _enc(tuple(n.args)),
            "kwargs": {k: _enc(v) for k, v in n.kwargs.items()},
        }
        meta = {k: n.meta[k] for k in _KEEP_META if k in n.meta}
        if meta:
            entry["meta"] = meta
        nodes.append(entry)
    return {"format": FORMAT_VERSION, "nodes": nodes}


def graph_from_json(data: dict, device: torch.device | str = "cpu") -> fx.Graph:
    if data.get("format") != FORMAT_VERSION:
        raise ValueError(f"program format {data.get('format')} is not the supported {FORMAT_VERSION}")
    device = torch.device(device)
    g = fx.Graph()
    env: dict[str, fx.Node] = {}
    for e in data["nodes"]:
        args = _dec(e["args"], env, device)
        kwargs = {k: _dec(v, env, device) for k, v in e["kwargs"].items()}
        if e["op"] == "placeholder":
            n = g.placeholder(e["target"])
        elif e["op"] == "get_attr":
            n = g.get_attr(e["target"])
        elif e["op"] == "call_function":
            n = g.call_function(resolve_target(e["target"]), args, kwargs)
        elif e["op"] == "output":
            n = g.output(args[0])
        else:
            raise ValueError(f"unsupported node kind {e['op']}")
        n.name = e["name"]
        n.meta.update(e.get("meta", {}))
        env[e["name"]] = n
    return g


def get_attr_targets(graph: fx.Graph) -> list[str]:
    return [n.target for n in graph.nodes if n.op == "get_attr"]


def fetch_attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def graph_module(source: fx.GraphModule, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule over `graph` whose get_attr targets are taken from `source`."""
    attrs = {t: fetch_attr(source, t) for t in get_attr_targets(graph)}
    return fx.GraphModule(attrs, graph)


def bind_device(gm: fx.GraphModule, device: torch.device | str) -> fx.GraphModule:
    """Rewrite every device argument (captured as meta) to `device`, as loading a stored program does."""
    device = torch.device(device)
    g = graph_from_json(graph_to_json(gm.graph), device)
    return fx.GraphModule(gm, g)
