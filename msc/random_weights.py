"""Random weights made where a program runs: benchmarks of full-size models without a checkpoint on disk.

A bundle compiled for the meta device has no weights; `load_random_program` builds each of a program's
tensors from its weight map (shape, dtype) directly on the role's device, the way transformers initialises
a model (normal(0, 0.02) matrices, norms 1, other vectors 0). Every tensor is seeded from its name, and
each expert's rows from the expert's global index, so that the colocated program and every expert node's
slice hold the same numbers: the same bundle gives the same tokens however it is deployed.
"""
from __future__ import annotations

import json
import zlib

import torch
import torch.fx as fx

from msc.ir import graph_from_json
from msc.ops import EXPERT_WEIGHT_ARGS, is_op

INIT_STD = 0.02  # transformers' default initializer_range


def _seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def random_tensor(name: str, shape: list[int], dtype: torch.dtype, device, seed: int = 0,
                  first_row: int | None = None) -> torch.Tensor:
    """One parameter. first_row: the tensor is rows first_row.. of an experts tensor [E, ...] (each row, one
    expert, seeded by its global index)."""
    if len(shape) <= 1:
        return (torch.ones if "norm" in name else torch.zeros)(shape, dtype=dtype, device=device)

    def normal(shape_, s):
        g = torch.Generator(device=device).manual_seed(s)
        return (torch.randn(shape_, generator=g, device=device, dtype=torch.float32) * INIT_STD).to(dtype)

    if first_row is None:
        return normal(shape, _seed(seed, name))
    out = torch.empty(shape, dtype=dtype, device=device)
    for i in range(shape[0]):
        out[i] = normal(shape[1:], _seed(seed, name, first_row + i))
    return out


def expert_first_rows(graph: fx.Graph) -> dict[str, int]:
    """get_attr target -> the global index of its first expert, for every weight an msc::experts call reads."""
    rows = {}
    for n in graph.nodes:
        if n.op == "call_function" and is_op(n, "experts"):
            first = int(n.args[6]) if len(n.args) > 6 else 0
            for i in EXPERT_WEIGHT_ARGS:
                if i < len(n.args) and isinstance(n.args[i], fx.Node):
                    rows[n.args[i].target] = first
    return rows


def load_random_program(bundle, name: str, device, seed: int = 0) -> fx.GraphModule:
    """A bundle program with random weights made on `device` (constants, e.g. rotary tables, from the bundle)."""
    from safetensors.torch import load_file

    device = torch.device(device)
    graph = graph_from_json(json.loads((bundle.path / "programs" / f"{name}.json").read_text()), device)
    wmap = json.loads((bundle.path / "weights" / f"{name}.json").read_text())
    constants = load_file(str(bundle.path / "constants.safetensors"))
    first_rows = expert_first_rows(graph)
    attrs = {}
    for target, e in wmap.items():
        if "constant" in e["source"]:
            attrs[target] = constants[e["source"]["constant"]].to(device)
        else:
            attrs[target] = random_tensor(target, e["shape"], getattr(torch, e["dtype"]), device, seed,
                                          first_rows.get(target))
    return fx.GraphModule(attrs, graph)
