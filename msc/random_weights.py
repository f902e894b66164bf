"""Random weights made where a program runs: benchmarks of full-size models without a checkpoint on disk.

A bundle compiled for the meta device has no weights; `Bundle.load_program(..., random_weights=True)` builds each of a program's
tensors from its weight map (shape, dtype) directly on the role's device, the way transformers initialises
a model (normal(0, 0.02) matrices, norms 1, other vectors 0). Every tensor is seeded from its name, and
each expert's rows from the expert's global index, so that the colocated program and every expert node's
slice hold the same numbers: the same bundle gives the same tokens however it is deployed.
"""
from __future__ import annotations

import zlib

import torch
import torch.fx as fx

from msc.ops import EXPERT_WEIGHT_ARGS, is_op

INIT_STD = 0.02  # transformers' default initializer_range


def _seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def random_tensor(name: str, shape: list[int], dtype: torch.dtype, device, seed: int = 0,
                  first_row: int | None = None, experts: list[int] | None = None) -> torch.Tensor:
    """One parameter. first_row: the tensor is rows first_row.. of an experts tensor [E, ...] (each row, one
    expert, seeded by its global index); experts: the global index of each row (a placement that moves or
    replicates experts)."""
    if len(shape) <= 1:
        return (torch.ones if "norm" in name else torch.zeros)(shape, dtype=dtype, device=device)

    def normal(shape_, s):
        g = torch.Generator(device=device).manual_seed(s)
        return (torch.randn(shape_, generator=g, device=device, dtype=torch.float32) * INIT_STD).to(dtype)

    if first_row is None and experts is None:
        return normal(shape, _seed(seed, name))
    ids = experts if experts is not None else range(first_row, first_row + shape[0])
    out = torch.empty(shape, dtype=dtype, device=device)
    for i, e in enumerate(ids):
        out[i] = normal(shape[1:], _seed(seed, name, e))
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


def random_attrs(graph: fx.Graph, entries, constants: dict[str, torch.Tensor], device, seed: int = 0) -> dict:
    """Tensors for a program's weight entries (msc.checkpoint.WeightEntry): random parameters made on
    `device`, constants (e.g. rotary tables) from the bundle's."""
    device = torch.device(device)
    first_rows = expert_first_rows(graph)
    attrs = {}
    for e in entries:
        if "constant" in e.source:
            attrs[e.target] = constants[e.source["constant"]].to(device)
        elif "tp_take" in e.source:
            # NOTE: a tensor-parallel share: the whole tensor is made (the same numbers as with tp = 1), then
            # this rank's share taken, so a tp deployment computes the same model as any other
            from msc.passes.shard_tensor_parallel import take_share

            how = e.source["tp_take"]
            whole = random_tensor(e.target, how["of"], e.dtype, device, seed, first_rows.get(e.target))
            attrs[e.target] = take_share(whole, how)
        else:
            attrs[e.target] = random_tensor(e.target, list(e.shape), e.dtype, device, seed, first_rows.get(e.target),
                                            e.source.get("experts"))
    return attrs
