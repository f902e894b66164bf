"""insert_dispatch_combine: turn the cut between the roles into M2N send/recv.

Attention program, before:  y = remote_experts(h, idx, w, l)
                   after:   t = dispatch(h, idx, w, l, bounds_l) ; y = combine(t, h, l)
Expert program, before:     placeholders hidden_l, index_l, weights_l ; output (y_0, ..., y_L)
                after:      (hidden_l, index_l, weights_l) = expert_recv(l, H, K, dtype)
                            y_l = experts(...) ; expert_send(y_l, l) ; output None
Both programs then take part in one exchange per MoE layer, in layer order.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from msc.errors import MscError
from msc.ir import ROLE_ATTENTION, ROLE_EXPERT, graph_meta
from msc.ops import MSC_OPS, is_op, slot_tables
from msc.pass_manager import Pass, PassResult, register_pass, require_ran


@register_pass
class InsertDispatchCombine(Pass):
    name = "insert_dispatch_combine"

    def requires(self, gm, ctx):
        require_ran(gm, "place_experts", self.name)

    def run(self, gm, ctx):
        roles = graph_meta(gm)["roles"]
        placement = graph_meta(gm)["placement"]
        n_att = self._attention_side(roles[ROLE_ATTENTION], placement)
        n_exp = self._expert_side(roles[ROLE_EXPERT], ctx)
        return PassResult(gm, {"dispatch_combine_pairs": n_att, "recv_send_pairs": n_exp})

    @staticmethod
    def _attention_side(att: fx.GraphModule, placement: dict) -> int:
        count = 0
        bounds, slots, shares = placement["bounds"], placement.get("slots", {}), placement.get("shares", {})
        for n in list(att.graph.nodes):
            if not is_op(n, "remote_experts"):
                continue
            hidden, idx, w, layer = n.args
            added = []
            with att.graph.inserting_before(n):
                layer_slots = slots.get(layer)
                if layer_slots is not None and layer_slots != list(range(len(layer_slots))):
                    # NOTE: experts moved or replicated: each pair's expert id becomes its slot before the dispatch
                    slot_of, cum, copies = slot_tables(layer_slots, shares[layer], max(layer_slots) + 1)
                    idx = att.graph.call_function(MSC_OPS["expert_slots"], (idx, layer, slot_of, cum, copies))
                    added.append(idx)
                ticket = att.graph.call_function(MSC_OPS["dispatch"], (hidden, idx, w, layer, list(bounds[layer])))
                out = att.graph.call_function(MSC_OPS["combine"], (ticket, hidden, layer))
            for new in (*added, ticket, out):
                new.meta["msc"] = {"role": ROLE_ATTENTION, "layer": layer}
            out.meta["val"] = n.meta.get("val")
            n.replace_all_uses_with(out)
            att.graph.erase_node(n)
            count += 1
        att.recompile()
        return count

    @staticmethod
    def _expert_side(exp: fx.GraphModule, ctx) -> int:
        g = exp.graph
        placeholders = {n.name: n for n in g.nodes if n.op == "placeholder"}
        calls = [n for n in g.nodes if is_op(n, "experts")]
        for call in calls:
            layer = call.args[5]
            h_ph = placeholders[f"hidden_{layer}"]
            dtype = h_ph.meta["val"].dtype if "val" in h_ph.meta else torch.float32
            with g.inserting_before(call):
                recv = g.call_function(
                    MSC_OPS["expert_recv"], (layer, ctx.moe["hidden_size"], ctx.moe["top_k"], dtype)
                )
                parts = [g.call_function(operator.getitem, (recv, i)) for i in range(3)]
            for name, part in zip(("hidden", "index", "weights"), parts):
                placeholders[f"{name}_{layer}"].replace_all_uses_with(part)
                part.meta["msc"] = {"role": ROLE_EXPERT, "layer": layer}
            recv.meta["msc"] = {"role": ROLE_EXPERT, "layer": layer}
            with g.inserting_after(call):
                send = g.call_function(MSC_OPS["expert_send"], (call, layer))
            send.meta["msc"] = {"role": ROLE_EXPERT, "layer": layer}
        out = next(n for n in g.nodes if n.op == "output")
        out.args = (None,)
        for ph in placeholders.values():
            if ph.users:
                raise MscError(f"expert program still reads boundary input {ph.name}")
            g.erase_node(ph)
        exp.recompile()
        return len(calls)

    def ensures(self, gm, ctx):
        roles = graph_meta(gm)["roles"]
        if any(is_op(n, "remote_experts") for n in roles[ROLE_ATTENTION].graph.nodes):
            raise MscError("insert_dispatch_combine left a remote_experts cut unlowered")
        if any(n.op == "placeholder" for n in roles[ROLE_EXPERT].graph.nodes):
            raise MscError("insert_dispatch_combine left inputs on the expert program")
