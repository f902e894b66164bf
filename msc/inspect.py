"""Per-role summary of a bundle (what `msc inspect` prints)."""
from __future__ import annotations

import math
import re
from collections import Counter, defaultdict

import torch.fx as fx

from msc.bundle import Bundle
from msc.errors import MscError
from msc.ir import fetch_attr

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int64": 8}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            break
        n /= 1024
    return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"


# NOTE: a parameter's layer is the first number in its module path (model.layers.7.…, transformer.blocks.7.…);
# parameters without one (embeddings, final norm, head) are counted under "other".
_LAYER = re.compile(r"\.(\d+)\.")


def layer_of(param: str) -> int | None:
    m = _LAYER.search(param)
    return int(m.group(1)) if m else None


def _op_name(target: str) -> str:
    """'torch.ops.aten.mm.default' -> 'aten.mm', 'torch.ops.msc.experts.default' -> 'msc.experts'."""
    parts = target.split(".")
    return ".".join(parts[2:4]) if target.startswith("torch.ops.") and len(parts) >= 4 else target


def _layer_ranges(layers: set[int]) -> str:
    """{0, 1, 2, 5} -> '0-2, 5'."""
    out, run = [], []
    for i in sorted(layers):
        if run and i != run[-1] + 1:
            out.append(run)
            run = []
        run.append(i)
    if run:
        out.append(run)
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in out) or "-"


def graph_summary(gm: fx.GraphModule, constants=()) -> dict:
    """What the captured graph holds: nodes, ops by name, weights (parameters and persistent buffers, what
    the checkpoint holds) and their bytes, per layer. `constants`: names of computed buffers (rotary
    frequencies), not counted. Stored in the manifest at compile time (the captured graph itself is only
    kept as code)."""
    ops: Counter = Counter()
    per_layer: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # layer -> [parameters, bytes]
    for n in gm.graph.nodes:
        if n.op == "call_function":
            ops[_op_name(str(n.target))] += 1
        elif n.op == "get_attr" and n.target not in constants:
            t = fetch_attr(gm, n.target)
            key = str(layer_of(n.target)) if layer_of(n.target) is not None else "other"
            per_layer[key][0] += t.numel()
            per_layer[key][1] += t.numel() * t.element_size()
    return {
        "nodes": len(gm.graph.nodes),
        "ops": dict(ops.most_common()),
        "parameters": sum(v[0] for v in per_layer.values()),
        "bytes": sum(v[1] for v in per_layer.values()),
        "layers": {k: {"parameters": v[0], "bytes": v[1]} for k, v in per_layer.items()},
    }



def role_layers(bundle_dir, role: str) -> list[dict]:
    """Per-layer detail of one role: parameters, bytes and msc ops in each layer ("other" last)."""
    b = Bundle.open(bundle_dir)
    by_name = {r["name"]: r for r in b.roles}
    if role not in by_name:
        raise MscError(f"bundle has no role '{role}' (roles: {', '.join(by_name)})")
    prog_name = by_name[role]["program"]
    prog = b.read_checked(f"programs/{prog_name}.json")
    wmap = b.read_checked(f"weights/{prog_name}.json")
    rows: dict[str, dict] = defaultdict(lambda: {"parameters": 0, "bytes": 0, "tensors": 0, "ops": Counter()})
    for param, e in wmap.items():
        if "constant" in e["source"]:
            continue
        key = str(layer_of(param)) if layer_of(param) is not None else "other"
        numel = math.prod(e["shape"])
        rows[key]["parameters"] += numel
        rows[key]["bytes"] += numel * _BYTES[e["dtype"]]
        rows[key]["tensors"] += 1
    for n in prog["nodes"]:
        layer = n.get("meta", {}).get("msc", {}).get("layer")
        if n["op"] == "call_function" and n["target"].startswith("torch.ops.msc.") and layer is not None:
            rows[str(layer)]["ops"][_op_name(n["target"])] += 1
    order = sorted((k for k in rows if k != "other"), key=int) + (["other"] if "other" in rows else [])
    return [{"layer": k, **{f: rows[k][f] for f in ("parameters", "bytes", "tensors")}, "bytes_h": human_bytes(rows[k]["bytes"]),
             "msc_ops": ", ".join(f"{o}×{c}" for o, c in sorted(rows[k]["ops"].items()))} for k in order]


def program_code(bundle_dir, role: str) -> str:
    """The Python code of the program `role` runs, generated from its JSON through the same checked loader
    the roles use (digest, allow-listed targets, fixed tables).

    NOTE: not the stored programs/NAME.py: that file is for people and nothing runs it, so showing it could
    hide what a modified bundle would actually run. Device arguments show as the bundle's device."""
    b = Bundle.open(bundle_dir)
    by_name = {r["name"]: r for r in b.roles}
    if role not in by_name:
        raise MscError(f"bundle has no role '{role}' (roles: {', '.join(by_name)})")
    device = b.manifest.get("device") or "cpu"
    graph = b.program_graph(by_name[role]["program"], device if device in ("cpu", "cuda", "meta", "mps") else "cpu")
    return graph.python_code("self").src


def _tp_group(role: dict) -> str:
    """'rank r of tp, group [global ranks]' for a tensor-parallel attention rank, '-' otherwise."""
    tp = role.get("tp")
    if not tp or tp["size"] == 1:
        return "-"
    return f"{tp['rank']}/{tp['size']} {tp['ranks']}"


def role_table(bundle_dir) -> tuple[list[dict], dict]:
    b = Bundle.open(bundle_dir)
    rows = []
    for role in b.roles:
        prog = b.read_checked(f"programs/{role['program']}.json")
        wmap = b.read_checked(f"weights/{role['program']}.json")
        ops = Counter(
            n["target"].split(".")[3] for n in prog["nodes"] if n["op"] == "call_function" and n["target"].startswith("torch.ops.msc.")
        )
        # computed constants (rotary tables) are not weights of the model
        numels = [(math.prod(e["shape"]), e["dtype"]) for e in wmap.values() if "constant" not in e["source"]]
        params = sum(n for n, _ in numels)
        nbytes = sum(n * _BYTES[dt] for n, dt in numels)
        stages = {n["meta"]["msc"]["stage"] for n in prog["nodes"] if "stage" in n.get("meta", {}).get("msc", {})}
        layers = {layer_of(p) for p in wmap} - {None}
        rows.append({
            "role": role["name"], "rank": role["rank"], "program": role["program"], "nodes": len(prog["nodes"]),
            "tp": _tp_group(role),
            "stages": len(stages), "layers": _layer_ranges(layers),
            "msc_ops": ", ".join(f"{k}×{v}" for k, v in sorted(ops.items())), "parameters": params, "bytes": nbytes,
            "bytes_h": human_bytes(nbytes),
        })
    return rows, b.manifest


def placement_report(bundle_dir, routing=None) -> dict:
    """Where each layer's experts sit (bundle manifest's expert_placement) and, with a routing profile (the
    one given, else the one place_experts was compiled with, if any), each node's expected share of the
    layer's (token, expert) pairs before (contiguous) and after, and the imbalance (busiest / mean) of the worst
    layer: {"strategy", "routing", "nodes": [{"experts": {layer: [...]}, "expected_load": {layer: share}}],
    "imbalance", "contiguous_imbalance", "imbalance_by_layer"}."""
    from msc.passes.place_experts import LayerPlacement, place_contiguous
    from msc.planner.routing import load_routing

    b = Bundle.open(bundle_dir)
    m = b.manifest
    placed = m.get("expert_placement") or {}
    bounds = {int(k): v for k, v in m["placement"].items()}
    slots = {int(k): v for k, v in placed.get("slots", {}).items()}
    shares = {int(k): v for k, v in placed.get("shares", {}).items()}
    if routing is None:
        step = next((p for p in m["passes"] if p["name"] == "place_experts"), {})
        routing = (step.get("config") or {}).get("routing")
    profile = load_routing(routing) if routing else None
    nodes = len(next(iter(bounds.values()))) - 1
    out_nodes = [{"experts": {}, "expected_load": {}} for _ in range(nodes)]
    by_layer, before = {}, {}
    for layer, bd in sorted(bounds.items()):
        s = slots.get(layer) or list(range(bd[-1]))
        p = LayerPlacement(s, bd, shares.get(layer) or [1.0] * len(s))
        for j in range(nodes):
            out_nodes[j]["experts"][layer] = p.node_experts(j)
        counts = profile.counts(layer) if profile is not None else None
        if counts is not None:
            total = sum(counts) or 1.0
            for j, load in enumerate(p.node_loads(counts)):
                out_nodes[j]["expected_load"][layer] = load / total
            by_layer[layer] = p.imbalance(counts)
            before[layer] = place_contiguous(len(counts), nodes).imbalance(counts)
    return {"strategy": placed.get("strategy", "contiguous"), "routing": None if routing is None else str(routing),
            "nodes": out_nodes, "imbalance": max(by_layer.values()) if by_layer else None,
            "contiguous_imbalance": max(before.values()) if before else None, "imbalance_by_layer": by_layer}
