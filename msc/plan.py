"""The resolved deployment plan: every field of the spec's `plan:` with a concrete value.

Unset fields take defaults here; the planner (a later issue) will choose them instead.
"""
from __future__ import annotations

from pydantic import BaseModel

from msc.errors import MscError
from msc.spec import PlanSpec


class AttentionSide(BaseModel):
    replicas: int
    tp: int


class ExpertSide(BaseModel):
    nodes: int
    tp: int


class Plan(BaseModel):
    attention: AttentionSide
    experts: ExpertSide
    microbatches: int
    batch_size: int

    @property
    def world_size(self) -> int:
        return self.attention.replicas * self.attention.tp + self.experts.nodes * self.experts.tp


DEFAULTS = {"attention.replicas": 1, "attention.tp": 1, "experts.tp": 1, "microbatches": 1, "batch_size": 32}


def resolve_plan(spec: PlanSpec, num_experts: int) -> Plan:
    nodes = spec.experts.nodes if spec.experts.nodes is not None else min(2, num_experts)
    if nodes > num_experts:
        raise MscError(
            f"plan.experts.nodes = {nodes} is more than the model's {num_experts} experts per layer: "
            f"use at most {num_experts} expert nodes"
        )
    plan = Plan(
        attention=AttentionSide(
            replicas=spec.attention.replicas or DEFAULTS["attention.replicas"], tp=spec.attention.tp or DEFAULTS["attention.tp"]
        ),
        experts=ExpertSide(nodes=nodes, tp=spec.experts.tp or DEFAULTS["experts.tp"]),
        microbatches=spec.microbatches or DEFAULTS["microbatches"],
        batch_size=spec.batch_size or DEFAULTS["batch_size"],
    )
    return plan
