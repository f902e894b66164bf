"""Record how the router spreads tokens over the experts, for the planner's routing profile
(msc.planner.routing): `msc run --colocated --record-routing FILE`.

While a recorder is active, every call of the experts op (msc.ops.experts) that holds the whole layer
(first_expert 0, the colocated program) adds its top-k ids to per-layer counts on the device (an index_add
into a fixed tensor: no host sync). The colocated engine runs without CUDA graphs while recording, since a
graph's padding rows would be counted too.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor

ACTIVE: "RoutingRecorder | None" = None


class RoutingRecorder:
    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.counts: dict[int, Tensor] = {}

    def add(self, layer: int, top_k_index: Tensor) -> None:
        ids = top_k_index.reshape(-1)  # [T * K]
        c = self.counts.get(layer)
        if c is None:
            c = self.counts[layer] = torch.zeros(self.num_experts, dtype=torch.int64, device=ids.device)
        c.index_add_(0, ids.long(), torch.ones_like(ids, dtype=torch.int64))

    def profile(self) -> dict:
        """The routing profile JSON (msc.planner.routing's format)."""
        return {"format": 1, "experts": self.num_experts,
                "layers": {str(layer): c.tolist() for layer, c in sorted(self.counts.items())}}

    def write(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.profile(), indent=1))
        tmp.replace(path)


def record(num_experts: int) -> RoutingRecorder:
    """Start recording (one recorder at a time)."""
    global ACTIVE
    ACTIVE = RoutingRecorder(num_experts)
    return ACTIVE


def stop() -> None:
    global ACTIVE
    ACTIVE = None
