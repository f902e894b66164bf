"""Passes and the pass manager: a declared, validated pipeline over the fx IR.

A pass is a class with a `name`, a pydantic `Config`, optional `requires` / `ensures` checks and
`run(gm, ctx) -> PassResult`. The pipeline is data: a list of {name, config} entries (the spec's
`passes:` key, or DEFAULT_PIPELINE). Every pass that runs is stamped into `gm.meta["msc"]["passes"]`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch.fx as fx
from pydantic import BaseModel, ConfigDict, ValidationError

from msc.errors import MscError
from msc.ir import graph_meta


class PassConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class PassResult:
    gm: fx.GraphModule
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What passes may read besides the graph: the resolved plan, the model's MoE shape, the adapter."""

    plan: Any
    moe: dict[str, int]
    adapter: Any = None
    hf_config: Any = None
    checkpoint: Any = None  # CheckpointReader or None (meta compile)
    constants: dict = field(default_factory=dict)


class Pass:
    name: ClassVar[str]
    Config: ClassVar[type[PassConfig]] = PassConfig

    def __init__(self, config: PassConfig | None = None):
        self.config = config or self.Config()

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """Raise MscError when the graph is not in the state this pass needs."""

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """Raise MscError when the pass did not leave the graph in the promised state."""

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError


PASSES: dict[str, type[Pass]] = {}

DEFAULT_PIPELINE = ["annotate_roles", "split_roles", "place_experts", "insert_dispatch_combine", "lower_roles", "pipeline_microbatches",
                    "shard_tensor_parallel"]


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available to pipelines by its `name`."""
    if cls.name in PASSES and PASSES[cls.name] is not cls:
        raise ValueError(f"a pass named '{cls.name}' is already registered")
    PASSES[cls.name] = cls
    return cls


def ran(gm: fx.GraphModule, name: str) -> bool:
    return any(p["name"] == name for p in graph_meta(gm).get("passes", []))


def require_ran(gm: fx.GraphModule, name: str, by: str) -> None:
    if not ran(gm, name):
        raise MscError(f"pass '{by}' needs pass '{name}' to run before it; fix the order of the pipeline")


class PassManager:
    def __init__(self, passes: list[Pass]):
        self.passes = passes

    @classmethod
    def from_entries(cls, entries: list[dict] | None) -> "PassManager":
        import msc.passes  # noqa: F401  (registers the built-in passes)

        entries = entries if entries is not None else [{"name": n} for n in DEFAULT_PIPELINE]
        built = []
        for i, e in enumerate(entries):
            name, conf = e["name"], e.get("config") or {}
            if name not in PASSES:
                raise MscError(f"passes[{i}]: unknown pass '{name}' (known: {', '.join(sorted(PASSES))})")
            try:
                built.append(PASSES[name](PASSES[name].Config.model_validate(conf)))
            except ValidationError as err:
                first = err.errors()[0]
                key = ".".join(str(p) for p in first["loc"])
                raise MscError(f"passes[{i}] ({name}): config key '{key}': {first['msg']}") from None
        return cls(built)

    def run(self, gm: fx.GraphModule, ctx: PassContext, progress=None) -> fx.GraphModule:
        for p in self.passes:
            p.requires(gm, ctx)
            t0 = time.perf_counter()
            result = p.run(gm, ctx)
            gm = result.gm
            p.ensures(gm, ctx)
            graph_meta(gm).setdefault("passes", []).append(
                {"name": p.name, "config": p.config.model_dump(), "seconds": round(time.perf_counter() - t0, 4), "info": result.info}
            )
            if progress is not None:
                progress(p.name)
        return gm
