"""split_roles: cut the graph into an attention program and an expert program.

Before (one graph):   h -> router -> (w, idx) ; y = experts(h, idx, w, Wgu_l, Wd_l) ; r = add(res, y)
After:
  attention program:  h -> router -> (w, idx) ; y = remote_experts(h, idx, w, l) ; r = add(res, y)
  expert program:     placeholders hidden_l, index_l, weights_l per MoE layer
                      y_l = experts(hidden_l, index_l, weights_l, Wgu_l, Wd_l, l, 0[, biases, act, layout])
                      output (y_0, y_1, ...)
The two programs live in gm.meta["msc"]["roles"]; the main graph is left as captured.
"""
from __future__ import annotations

import torch.fx as fx

from msc.errors import MscError
from msc.ir import ROLE_ATTENTION, ROLE_EXPERT, get_attr_targets, graph_meta, graph_module, node_meta
from msc.ops import MSC_OPS, expert_weight_nodes, is_op
from msc.pass_manager import Pass, PassResult, register_pass, require_ran


@register_pass
class SplitRoles(Pass):
    name = "split_roles"

    def requires(self, gm, ctx):
        require_ran(gm, "annotate_roles", self.name)

    def run(self, gm, ctx):
        # attention side: the whole graph with each experts call replaced by the remote_experts cut
        att_graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for n in gm.graph.nodes:
            if is_op(n, "experts"):
                hidden, idx, w = (env[a] for a in n.args[:3])
                layer = n.args[5]
                new = att_graph.call_function(MSC_OPS["remote_experts"], (hidden, idx, w, layer))
                new.meta.update(n.meta)
                new.meta["msc"] = {**node_meta(n), "role": ROLE_ATTENTION, "layer": layer}
            else:
                new = att_graph.node_copy(n, lambda x: env[x])
            env[n] = new
        att_graph.eliminate_dead_code()  # drops the expert weights' get_attr nodes
        attention = graph_module(gm, att_graph)

        # expert side: one experts call per MoE layer, fed by boundary placeholders
        exp_graph = fx.Graph()
        outputs = []
        for n in gm.graph.nodes:
            if not is_op(n, "experts"):
                continue
            layer = n.args[5]
            h = exp_graph.placeholder(f"hidden_{layer}")
            i = exp_graph.placeholder(f"index_{layer}")
            w = exp_graph.placeholder(f"weights_{layer}")
            for ph, src in zip((h, i, w), n.args[:3]):
                if "val" in src.meta:
                    ph.meta["val"] = src.meta["val"]
            # weights (gate_up, down, biases) become the expert program's own get_attr nodes; scalars stay
            weights = {a: exp_graph.get_attr(a.target) for a in expert_weight_nodes(n)}
            args = [h, i, w] + [weights.get(a, a) if isinstance(a, fx.Node) else a for a in n.args[3:]]
            args[6] = 0  # first_expert: the whole layer until lower_roles slices it per node
            y = exp_graph.call_function(MSC_OPS["experts"], tuple(args), dict(n.kwargs))
            y.meta.update(n.meta)
            for node in (h, i, w, *weights.values(), y):
                node.meta["msc"] = {"role": ROLE_EXPERT, "layer": layer}
            outputs.append(y)
        exp_graph.output(tuple(outputs))
        expert = graph_module(gm, exp_graph)

        graph_meta(gm)["roles"] = {ROLE_ATTENTION: attention, ROLE_EXPERT: expert}
        return PassResult(gm, {"moe_layers": len(outputs)})

    def ensures(self, gm, ctx):
        roles = graph_meta(gm)["roles"]
        if any(is_op(n, "experts") for n in roles[ROLE_ATTENTION].graph.nodes):
            raise MscError("split_roles left an experts call on the attention side")
        shared = set(get_attr_targets(roles[ROLE_ATTENTION].graph)) & set(get_attr_targets(roles[ROLE_EXPERT].graph))
        if shared:
            raise MscError(f"split_roles left weights on both sides: {sorted(shared)[:3]}")
