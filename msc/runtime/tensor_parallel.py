"""The tensor-parallel group of this process: the ranks that share one role's layers.

A role process that is one of tp ranks joins its group once at start (`join`); the `msc::tp_all_reduce`
op of its program then sums partial results over the group (gloo on the CPU, NCCL on a GPU). Outside a
group (tp = 1, or a program run in a test without one) the op is the identity.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

_group: dict = {"pg": None, "rank": 0, "size": 1}


def join(pg, rank: int, size: int) -> None:
    """Make `pg` (a torch.distributed process group of `size` ranks, this one `rank`) this process's tp group."""
    _group.update(pg=pg, rank=rank, size=size)


def leave() -> None:
    _group.update(pg=None, rank=0, size=1)


def rank() -> int:
    return _group["rank"]


def size() -> int:
    return _group["size"]


def all_reduce(x: Tensor) -> Tensor:
    """The sum of x over the group (a new tensor; x itself is left as it was)."""
    if _group["pg"] is None or _group["size"] == 1:
        return x
    out = x.contiguous().clone()
    # NOTE: reduced in float32 when x is a lower precision on the CPU (gloo sums bf16 poorly); on a GPU NCCL
    # sums in the tensor's own dtype, as every tensor-parallel engine does
    if out.device.type == "cpu" and out.dtype in (torch.bfloat16, torch.float16):
        wide = out.float()
        dist.all_reduce(wide, group=_group["pg"])
        return wide.to(x.dtype)
    dist.all_reduce(out, group=_group["pg"])
    return out
