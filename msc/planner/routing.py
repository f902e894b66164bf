"""Routing skew for the planner: how unevenly a model's router spreads tokens over its experts.

A routing profile (JSON, `planner: {routing: FILE}` in a spec) gives, per MoE layer, how many (token, expert)
pairs each expert received over some run (or any numbers in those proportions):

    {"format": 1, "experts": 8,
     "layers": {"1": [900, 850, 40, 30, 60, 50, 40, 30], "2": [...]},   # by layer index
     "default": [120, 130, 125, 118, 122, 127, 131, 127]}                 # optional: layers not listed

With experts placed in contiguous blocks (the compiler's `place_experts`), an expert node's share of a layer's
pairs is the sum over its block; the node with the largest share sets the layer's expert time (the others wait
for it at the combine). `load_factor(layer, nodes)` is that largest share times the node count: 1.0 for uniform
routing, up to `nodes` when one node takes everything. Layers the profile does not cover are uniform.

NOTE: the pairs a node computes scale with its share; the weights it reads (the experts hit) are left as under
uniform routing, which for decode batches of a few hundred tokens and more is every expert on the node anyway.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from msc.errors import MscError


class RoutingProfile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: int = 1
    experts: int = Field(ge=1)
    layers: dict[int, list[float]] = Field(default_factory=dict)
    default: Optional[list[float]] = None

    @field_validator("layers")
    @classmethod
    def _layers(cls, v):
        for layer, counts in v.items():
            if layer < 0:
                raise ValueError(f"layer {layer}: layer indices are >= 0")
            _check(counts, f"layer {layer}")
        return v

    @field_validator("default")
    @classmethod
    def _default(cls, v):
        if v is not None:
            _check(v, "default")
        return v

    def counts(self, layer: int) -> list[float] | None:
        return self.layers.get(layer, self.default)

    # how the compiler will place the experts (the spec's `planner: {placement: ..., replicas_per_node: R}`,
    # the strategies of passes/place_experts.py); not part of the file
    strategy: str = Field("contiguous", exclude=True)
    replicas_per_node: int = Field(1, ge=0, exclude=True)
    _placed: dict = PrivateAttr(default_factory=dict)  # (layer, nodes, strategy, replicas) -> load factor

    @property
    def extra_slots(self) -> int:
        """Expert slots each node holds beyond contiguous's (copies of hot experts: memory)."""
        return self.replicas_per_node if self.strategy == "replicated" else 0

    def load_factor(self, layer: int, nodes: int) -> float:
        """The busiest expert node's share of the layer's pairs, times `nodes`, under the placement strategy
        (contiguous blocks unless told otherwise)."""
        c = self.counts(layer)
        if c is None:
            return 1.0
        if self.strategy == "contiguous":
            return busiest_share(c, nodes) * nodes
        key = (layer, nodes, self.strategy, self.replicas_per_node)
        if key not in self._placed:
            from msc.passes.place_experts import place_layer

            self._placed[key] = place_layer(self.strategy, c, len(c), nodes, self.replicas_per_node).imbalance(c)
        return self._placed[key]

    def check_model(self, num_experts: int, num_layers: int) -> None:
        if self.experts != num_experts:
            raise MscError(f"the routing profile is for {self.experts} experts; the model has {num_experts}")
        beyond = sorted(layer for layer in self.layers if layer >= num_layers)
        if beyond:
            raise MscError(f"the routing profile has layers {beyond[:8]}, but the model has {num_layers} (0 to "
                           f"{num_layers - 1})")
        for layer in self.layers:
            if len(self.layers[layer]) != num_experts:
                raise MscError(f"routing profile layer {layer}: {len(self.layers[layer])} counts for {num_experts} experts")
        if self.default is not None and len(self.default) != num_experts:
            raise MscError(f"routing profile default: {len(self.default)} counts for {num_experts} experts")


def _check(counts: list[float], where: str) -> None:
    if any(not c >= 0 for c in counts):
        raise ValueError(f"{where}: counts must be finite numbers >= 0")
    if sum(counts) <= 0 or sum(counts) == float("inf"):
        raise ValueError(f"{where}: counts must add up to a positive, finite number")


def busiest_share(counts: list[float], parts: int) -> float:
    """The largest share of the total held by one of `parts` contiguous blocks of ceil(E / parts) experts."""
    total, e = float(sum(counts)), len(counts)
    size = -(-e // parts)
    return max(sum(counts[i:i + size]) for i in range(0, e, size)) / total


def load_routing(path: str | Path) -> RoutingProfile:
    try:
        return RoutingProfile.model_validate(json.loads(Path(path).read_text()))
    except FileNotFoundError:
        raise MscError(f"routing profile {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise MscError(f"routing profile {path} is not valid JSON: {e}") from None
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "the file"
        raise MscError(f"routing profile {path} is not valid: {where}: {first['msg']}") from None
