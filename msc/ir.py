"""IR conventions on top of torch.fx, and the JSON form of a program stored in a bundle.

- `node.meta["msc"]`: {"role": "attention"|"expert", "layer": int, ...}
- `gm.meta["msc"]`: {"spec": ..., "plan": ..., "passes": [provenance...], "roles": {...}, ...}

A program is stored as JSON (no pickle): its nodes with targets named by their qualified op names,
arguments with node references, and get_attr targets that name entries of the role's weight map.
Device arguments are stored as a marker and bound to the role's device when the program is loaded.

Programs are data, never code: loading one checks every call target against an allow-list
(msc.program_targets) and decodes dtypes, layouts and memory formats from fixed tables before any node is
built, so a crafted program can neither import a module nor load a library.
"""
from __future__ import annotations

import functools
import keyword
import operator
import re
from typing import Any

import torch
import torch.fx as fx

import msc.ops  # noqa: F401  (registers the msc op namespace)
from msc.errors import MscError
from msc.program_targets import ATEN_TARGETS

ROLE_ATTENTION = "attention"
ROLE_EXPERT = "expert"
FORMAT_VERSION = 1


def node_meta(node: fx.Node) -> dict:
    return node.meta.setdefault("msc", {})


def graph_meta(gm: fx.GraphModule) -> dict:
    return gm.meta.setdefault("msc", {})


# ---------------------------------------------------------------------------------------------- targets
_BUILTINS = {f"operator.{n}": getattr(operator, n) for n in ("getitem", "add", "sub", "mul", "floordiv", "truediv", "neg", "mod", "eq", "ne", "lt", "le", "gt", "ge")}
_TARGET_RULE = "msc's own ops, the aten ops listed in msc/program_targets.py, or operator builtins"


@functools.lru_cache(maxsize=None)
def _msc_op_names() -> frozenset[str]:
    """The ops msc.ops registered (`msc::NAME`), read from the dispatcher's table rather than by attribute lookup."""
    return frozenset(n.removeprefix("msc::") for n in torch._C._dispatch_get_all_op_names() if n.startswith("msc::"))


@functools.lru_cache(maxsize=4096)
def allowed_target(name: Any) -> Any:
    """The callable a stored target name stands for, or None when the name is not on the allow-list.

    NOTE: the name is checked against fixed tables before any attribute is looked up, so a crafted name
    (`torch.ops.load_library.__self__.load_library`, `torch.ops.aten.from_file.default`) is refused without
    touching torch.ops: getattr on torch.ops namespaces can load libraries and import modules.
    """
    if not isinstance(name, str):
        return None
    if name in _BUILTINS:
        return _BUILTINS[name]
    parts = name.split(".")
    if len(parts) != 5 or parts[:2] != ["torch", "ops"]:
        return None
    namespace, op, overload = parts[2:]
    if namespace == "aten":
        if name not in ATEN_TARGETS:
            return None
    elif namespace == "msc":
        if not all(p.isidentifier() and not p.startswith("_") for p in (op, overload)) or op not in _msc_op_names():
            return None
        if overload not in getattr(torch.ops.msc, op).overloads():
            return None
    else:
        return None
    resolved = getattr(getattr(getattr(torch.ops, namespace), op), overload)
    return resolved if isinstance(resolved, torch._ops.OpOverload) else None


def target_name(target: Any) -> str:
    """The stored name of a call target; MscError when programs may not call it (checked when compiling, so
    a model using an op outside the allow-list fails to compile rather than to load)."""
    if isinstance(target, torch._ops.OpOverload):
        name = f"torch.ops.{target.namespace}.{target._opname}.{target._overloadname}"
    else:
        name = next((n for n, fn in _BUILTINS.items() if target is fn), target if isinstance(target, str) else None)
    if name is None or allowed_target(name) is None:
        raise MscError(f"the program calls {name or repr(target)}, which a stored program may not call (allowed: "
                       f"{_TARGET_RULE}); if it is a pure tensor computation, add it to msc/program_targets.py")
    return name


def resolve_target(name: Any, node: str = "?", source: str = "program") -> Any:
    """The callable for a stored target name; MscError naming the node when it is not on the allow-list."""
    fn = allowed_target(name) if isinstance(name, str) else None
    if fn is None:
        raise MscError(f"{source}: node '{node}' calls '{name}', which is not an allowed call target ({_TARGET_RULE}); "
                       "refusing to load the program")
    return fn


# ---------------------------------------------------------------------------------------------- args
# NOTE: fixed tables, never getattr(torch, name): a stored name can only pick one of these values.
DTYPES: dict[str, torch.dtype] = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.uint8, torch.bool, torch.complex64, torch.complex128, torch.float8_e4m3fn, torch.float8_e5m2)}
LAYOUTS: dict[str, torch.layout] = {str(x).removeprefix("torch."): x for x in (
    torch.strided, torch.sparse_coo, torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc)}
MEMORY_FORMATS: dict[str, torch.memory_format] = {str(x).removeprefix("torch."): x for x in (
    torch.contiguous_format, torch.preserve_format, torch.channels_last, torch.channels_last_3d)}
_DEVICE_MARKER = "role"


def decode_dtype(name: Any, where: str) -> torch.dtype:
    """The dtype a stored name stands for; MscError naming `where` for any name outside DTYPES."""
    if not isinstance(name, str) or name not in DTYPES:
        raise MscError(f"{where}: unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


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
        return {"$device": _DEVICE_MARKER}
    if isinstance(a, torch.layout):
        return {"$layout": str(a).removeprefix("torch.")}
    if isinstance(a, torch.memory_format):
        return {"$memory_format": str(a).removeprefix("torch.")}
    if isinstance(a, slice):
        return {"$slice": [_enc(a.start), _enc(a.stop), _enc(a.step)]}
    raise ValueError(f"cannot store argument {a!r} of type {type(a).__name__} in a program")


def _from_table(table: dict, what: str, v: Any, where: str) -> Any:
    if not isinstance(v, str) or v not in table:
        raise MscError(f"{where}: unknown {what} {v!r}; expected one of {', '.join(table)}")
    return table[v]


def _dec(a: Any, env: dict[str, fx.Node], device: torch.device, where: str) -> Any:
    """Decode one stored argument; `where` ("FILE: node 'x'") prefixes every error."""
    if a is None or isinstance(a, (bool, int, float, str)):
        return a
    if not isinstance(a, dict) or len(a) != 1:
        raise MscError(f"{where}: argument {str(a)[:80]} is not a stored value (a scalar or one {{\"$kind\": ...}} entry)")
    (kind, v), = a.items()
    if kind == "$node":
        if not isinstance(v, str) or v not in env:
            raise MscError(f"{where}: argument refers to node {str(v)[:80]!r}, which is not an earlier node of the program")
        return env[v]
    if kind in ("$list", "$tuple", "$slice"):
        if not isinstance(v, list) or (kind == "$slice" and len(v) != 3):
            raise MscError(f"{where}: {kind} holds {str(v)[:80]}; expected a list" + (" of 3" if kind == "$slice" else ""))
        items = [_dec(x, env, device, where) for x in v]
        return items if kind == "$list" else tuple(items) if kind == "$tuple" else slice(*items)
    if kind == "$dtype":
        return decode_dtype(v, where)
    if kind == "$device":
        if v != _DEVICE_MARKER:
            raise MscError(f"{where}: device {str(v)[:80]!r} is stored; programs store only the marker '{_DEVICE_MARKER}'")
        return device
    if kind == "$layout":
        return _from_table(LAYOUTS, "layout", v, where)
    if kind == "$memory_format":
        return _from_table(MEMORY_FORMATS, "memory format", v, where)
    raise MscError(f"{where}: unknown argument encoding {str(kind)[:80]!r}")


_KEEP_META = ("msc",)
_KINDS = ("placeholder", "get_attr", "call_function", "output")
_ENTRY_KEYS = {"name", "op", "target", "args", "kwargs"}


def graph_to_json(graph: fx.Graph) -> dict:
    nodes = []
    for n in graph.nodes:
        if n.op not in _KINDS:
            raise ValueError(f"cannot store node {n.name} of kind {n.op} in a program (kinds: {', '.join(_KINDS)})")
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


# a part of a weight's module path: an identifier not starting with "__" (no dunder attributes), or an index
_WEIGHT_PART = re.compile(r"(?!__)[A-Za-z_][A-Za-z0-9_]*|[0-9]+")


def _is_name(s: Any) -> bool:
    """A plain Python identifier: what fx writes verbatim into the program's generated code."""
    return isinstance(s, str) and s.isidentifier() and not keyword.iskeyword(s)


def _check_entry(e: Any, i: int, source: str, names: set[str]) -> str:
    """Validate the shape of stored node `i` (everything fx would write into generated code); its name."""
    if not isinstance(e, dict) or not _ENTRY_KEYS <= set(e) or set(e) - _ENTRY_KEYS - {"meta"}:
        raise MscError(f"{source}: node #{i} is not a stored node (expected the keys {', '.join(sorted(_ENTRY_KEYS))} "
                       "and optionally meta)")
    name, op, target = e["name"], e["op"], e["target"]
    where = f"{source}: node #{i}"
    # NOTE: names, placeholder targets and keyword names are written into the code fx generates and executes,
    # so each must be a plain identifier; anything else could smuggle Python source into the program.
    if not _is_name(name):
        raise MscError(f"{where}: name {str(name)[:80]!r} is not a Python identifier")
    if name in names:
        raise MscError(f"{where}: name '{name}' is used by an earlier node; node names must be unique")
    where = f"{source}: node '{name}'"
    if op not in _KINDS:
        raise MscError(f"{where}: unsupported node kind {str(op)[:80]!r}; expected one of {', '.join(_KINDS)}")
    if op == "placeholder" and not _is_name(target):
        raise MscError(f"{where}: input name {str(target)[:80]!r} is not a Python identifier")
    if op == "get_attr" and not (isinstance(target, str)
                                 and all(_WEIGHT_PART.fullmatch(p) for p in target.split("."))):
        raise MscError(f"{where}: weight name {str(target)[:80]!r} is not a dotted path of identifiers and indices")
    if not isinstance(e["kwargs"], dict) or not all(_is_name(k) for k in e["kwargs"]):
        raise MscError(f"{where}: keyword arguments must be a mapping keyed by Python identifiers")
    if not (isinstance(e["args"], dict) and set(e["args"]) == {"$tuple"}):
        raise MscError(f"{where}: positional arguments must be stored as a $tuple")
    meta = e.get("meta", {})
    if not isinstance(meta, dict) or set(meta) - set(_KEEP_META) or not all(isinstance(v, dict) for v in meta.values()):
        raise MscError(f"{where}: meta may hold only {', '.join(_KEEP_META)} (a mapping)")
    return name


def graph_from_json(data: Any, device: torch.device | str = "cpu", *, source: str = "program") -> fx.Graph:
    """Rebuild a stored program, checking it first: every call target on the allow-list, every name an
    identifier, every argument a known encoding referring to earlier nodes. Nothing outside the allow-list is
    looked up or run; any violation is an MscError naming `source` (the file) and the node."""
    if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION or not isinstance(data.get("nodes"), list):
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise MscError(f"{source}: not a program of the supported format {FORMAT_VERSION} (format: {str(got)[:40]}, "
                       "expected a mapping with a list of nodes)")
    device = torch.device(device)
    g = fx.Graph()
    env: dict[str, fx.Node] = {}
    entries = data["nodes"]
    for i, e in enumerate(entries):
        name = _check_entry(e, i, source, set(env))
        where = f"{source}: node '{name}'"
        op = e["op"]
        # NOTE: the target is checked before the arguments are decoded and before any node exists
        fn = resolve_target(e["target"], name, source) if op == "call_function" else None
        args = _dec(e["args"], env, device, where)
        kwargs = {k: _dec(v, env, device, where) for k, v in e["kwargs"].items()}
        if op == "placeholder":
            n = g.placeholder(e["target"])
        elif op == "get_attr":
            n = g.get_attr(e["target"])
        elif op == "call_function":
            n = g.call_function(fn, args, kwargs)
        else:
            if i != len(entries) - 1 or len(args) != 1 or kwargs:
                raise MscError(f"{where}: the output node must be the last node and have exactly one argument")
            n = g.output(args[0])
        n.name = name
        n.meta.update(e.get("meta", {}))
        env[name] = n
    if not entries or entries[-1].get("op") != "output":
        raise MscError(f"{source}: the program has no output node; expected one as its last node")
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
