"""annotate_roles: mark every node with the role that executes it.

Before:  x -> attention -> ... -> router -> experts(x, idx, w, W_gate_up, W_down) -> add -> ...
After:   the same graph; node.meta["msc"]["role"] = "expert" on `experts` and on the weights only it
         reads, "attention" everywhere else (embeddings, attention, router, residuals, head).

Option `shared_experts` (the placement rule for shared experts and dense MLP layers): "attention", the
only rule implemented, runs them with the attention replicas, next to the router. NOTE: a shared expert
sees every token, so on the attention side it needs no communication and scales with the replicas, at the
price of its weights on every replica (DeepSeek-V3: one 2048-wide expert per layer, about 2 % of the
model); the alternative, an extra always-chosen expert on the expert side, would move those weights off
the replicas but send every token to one node and is not implemented.
"""
from __future__ import annotations

from typing import Literal

from msc.errors import MscError
from msc.ir import ROLE_ATTENTION, ROLE_EXPERT, node_meta
from msc.ops import is_op
from msc.pass_manager import Pass, PassConfig, PassResult, register_pass


@register_pass
class AnnotateRoles(Pass):
    name = "annotate_roles"

    class Config(PassConfig):
        shared_experts: Literal["attention"] = "attention"

    def requires(self, gm, ctx):
        if not any(is_op(n, "experts") for n in gm.graph.nodes):
            raise MscError("the captured graph has no msc::experts node: the model has no MoE layers to disaggregate")

    def run(self, gm, ctx):
        counts = {ROLE_ATTENTION: 0, ROLE_EXPERT: 0}
        for n in gm.graph.nodes:
            if n.op in ("placeholder", "output"):
                role = ROLE_ATTENTION
            elif is_op(n, "experts"):
                role = ROLE_EXPERT
            elif n.op == "get_attr" and n.users and all(is_op(u, "experts") for u in n.users):
                role = ROLE_EXPERT
            else:
                role = ROLE_ATTENTION
            node_meta(n)["role"] = role
            counts[role] += 1
        return PassResult(gm, {"nodes_per_role": counts, "shared_experts": self.config.shared_experts})

    def ensures(self, gm, ctx):
        missing = [n.name for n in gm.graph.nodes if "role" not in node_meta(n)]
        if missing:
            raise MscError(f"annotate_roles left nodes without a role: {missing[:5]}")
