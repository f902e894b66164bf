"""Record how the router spreads tokens over the experts, for the planner's routing profile
(msc.planner.routing) and for place_experts: `msc run [--colocated] --record-routing FILE`.

While a recorder is active, every call of the experts op (msc.ops.experts) that holds the whole layer
(first_expert 0, the colocated program), and every dispatch of an attention replica (msc.ops.dispatch: its
slot ids mapped back to experts), adds its top-k ids to per-layer counts on the device (an index_add into a
fixed tensor: no host sync). Recording runs without CUDA graphs (colocated) and without the device exchange
or stage graphs (roles), since a graph's padding rows would be counted too.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor

ACTIVE: "RoutingRecorder | None" = None


class RoutingRecorder:
    """Per-layer (token, expert) pair counts. slot_maps {layer: slot -> expert}: the ids `add_slots` sees are
    slots of a placement that moved or replicated experts (passes/place_experts), counted as their experts."""

    def __init__(self, num_experts: int, slot_maps: dict[int, list[int]] | None = None):
        self.num_experts = num_experts
        self.counts: dict[int, Tensor] = {}
        self.slot_maps = slot_maps or {}
        self._maps: dict[tuple, Tensor] = {}

    def add_slots(self, layer: int, slot_index: Tensor) -> None:
        """Count pairs given as the slot ids the attention side dispatches (the identity without a slot map)."""
        m = self.slot_maps.get(layer)
        if m is not None:
            key = (layer, slot_index.device)
            if key not in self._maps:
                self._maps[key] = torch.tensor(m, dtype=torch.int64, device=slot_index.device)
            slot_index = self._maps[key][slot_index.long()]
        self.add(layer, slot_index)

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
        write_profile({layer: c.tolist() for layer, c in self.counts.items()}, self.num_experts, path)


def record(num_experts: int, slot_maps: dict[int, list[int]] | None = None) -> RoutingRecorder:
    """Start recording (one recorder at a time)."""
    global ACTIVE
    ACTIVE = RoutingRecorder(num_experts, slot_maps)
    return ACTIVE


def slot_maps_of(manifest: dict) -> dict[int, list[int]]:
    """{layer: slot -> expert} of a bundle's placement where it is not the identity."""
    slots = (manifest.get("expert_placement") or {}).get("slots", {})
    return {int(k): v for k, v in slots.items() if v != list(range(len(v)))}


def write_profile(counts: dict[int, list[int]], num_experts: int, path: str | Path) -> None:
    """A routing profile file from per-layer counts (msc.planner.routing's format), written atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"format": 1, "experts": num_experts,
                               "layers": {str(k): v for k, v in sorted(counts.items())}}, indent=1))
    tmp.replace(path)


def stop() -> None:
    global ACTIVE
    ACTIVE = None
