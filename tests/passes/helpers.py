"""Run a pipeline prefix on a toy graph, and execute lowered programs with in-process stand-ins for peers."""
from __future__ import annotations

import torch

from msc.pass_manager import PassContext, PassManager
from msc.plan import resolve_plan
from msc.spec import PlanSpec
from msc.runtime import context


def run_passes(gm, names, nodes=2, experts=4):
    plan = resolve_plan(PlanSpec.model_validate({"experts": {"nodes": nodes}}), experts)
    ctx = PassContext(plan=plan, moe={"num_experts": experts, "top_k": 2, "hidden_size": 8, "intermediate_size": 16}, adapter=_PlainAdapter())
    entries = [n if isinstance(n, dict) else {"name": n} for n in names]
    return PassManager.from_entries(entries).run(gm, ctx), ctx


class _PlainAdapter:
    """Checkpoint keys equal graph parameter names."""

    def checkpoint_source(self, param, keys, config, rows):
        src = {"key": param}
        if rows is not None:
            src["rows"] = list(rows)
        return src


class LoopbackPeers:
    """Both ends of the M2N exchange in one process: dispatch runs the expert programs' layer directly.

    Attention side: dispatch hands each node the tokens routed to it; the expert programs are executed
    layer by layer through expert_recv/expert_send; combine sums what they sent back.
    """

    def __init__(self, expert_layers):
        self.expert_layers = expert_layers  # callables: (layer, x, idx, w, node) -> partial output
        self._out = {}

    def dispatch(self, hidden, idx, w, layer, bounds):
        total = torch.zeros_like(hidden)
        for j in range(len(bounds) - 1):
            tok = ((idx >= bounds[j]) & (idx < bounds[j + 1])).any(-1).nonzero().squeeze(1)
            total.index_add_(0, tok, self.expert_layers(layer, hidden[tok], idx[tok], w[tok], j))
        self._out[layer] = total
        return torch.tensor([layer])

    def combine(self, ticket, hidden, layer):
        return self._out.pop(layer)

    def attention(self, *a):
        raise AssertionError("no attention in toy graphs")


class ExpertFeeder:
    """Expert-side context: expert_recv yields given inputs per layer; expert_send records outputs."""

    def __init__(self, inputs):
        self.inputs, self.sent = inputs, {}

    def expert_recv(self, layer, hidden_size, top_k, dtype):
        return self.inputs[layer]

    def expert_send(self, hidden, layer):
        self.sent[layer] = hidden


def run_expert_program(gm, inputs):
    feeder = ExpertFeeder(inputs)
    with context.use(feeder):
        gm()
    return feeder.sent
