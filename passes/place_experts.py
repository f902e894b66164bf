"""place_experts: assign each MoE layer's experts to the expert nodes of the plan.

Before:  expert program, experts(hidden_l, index_l, weights_l, Wgu_l, Wd_l, l, 0) per layer
After:   the same program; node.meta["msc"]["placement"] = [b0, b1, ..., bN] on each experts call
         (node j holds experts b_j..b_{j+1}-1 of that layer), and gm.meta["msc"]["placement"] holds
         the table for every layer.
"""
from __future__ import annotations

from typing import Literal

from msc.errors import MscError
from msc.ir import ROLE_EXPERT, fetch_attr, graph_meta, node_meta
from msc.ops import is_op
from msc.pass_manager import Pass, PassConfig, PassResult, register_pass, require_ran


class PlaceExpertsConfig(PassConfig):
    # NOTE: contiguous blocks of equal size are the whole strategy for now; load-aware placement with
    # hot-expert replicas (networkx assignment over a routing profile) slots in as another strategy.
    strategy: Literal["contiguous"] = "contiguous"


def contiguous_bounds(num_experts: int, num_nodes: int) -> list[int]:
    """Split experts 0..E-1 into N contiguous blocks whose sizes differ by at most one."""
    return [(j * num_experts) // num_nodes for j in range(num_nodes + 1)]


@register_pass
class PlaceExperts(Pass):
    name = "place_experts"
    Config = PlaceExpertsConfig

    def requires(self, gm, ctx):
        require_ran(gm, "split_roles", self.name)

    def run(self, gm, ctx):
        nodes = ctx.plan.experts.nodes
        table = {}
        expert_gm = graph_meta(gm)["roles"][ROLE_EXPERT]
        for n in expert_gm.graph.nodes:
            if not is_op(n, "experts"):
                continue
            num_experts = fetch_attr(expert_gm, n.args[3].target).shape[0]
            if nodes > num_experts:
                raise MscError(
                    f"plan.experts.nodes = {nodes} is more than the {num_experts} experts of layer {n.args[5]}: "
                    f"use at most {num_experts} expert nodes"
                )
            bounds = contiguous_bounds(num_experts, nodes)
            node_meta(n)["placement"] = bounds
            table[n.args[5]] = bounds
        graph_meta(gm)["placement"] = {"num_nodes": nodes, "bounds": table}
        return PassResult(gm, {"nodes": nodes, "experts_per_node": [b1 - b0 for b0, b1 in zip(bounds, bounds[1:])]})
