"""lower_roles: instantiate one program per role process, each with its weight map.

Before:  gm.meta["msc"]["roles"] = {"attention": A, "expert": X} (X holds every expert of each layer)
After:   gm.meta["msc"]["programs"] = {
           "attention": Program(A, weights: every attention-side parameter -> checkpoint source),
           "expert.j":  Program(X with experts(..., first_expert=b_j) over weight slices [b_j, b_j+1),
                                weights: only rows b_j..b_j+1-1 of each layer's expert tensors) }
Weight sources are checked against the checkpoint's headers (shape) when a checkpoint is present.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch.fx as fx

from msc.errors import MscError
from msc.ir import ROLE_ATTENTION, ROLE_EXPERT, fetch_attr, get_attr_targets, graph_meta
from msc.ops import expert_weight_nodes, is_op
from msc.pass_manager import Pass, PassResult, register_pass, require_ran


@dataclass
class Program:
    """One role's executable: its graph, and for each get_attr target where its tensor comes from."""

    role: str
    gm: fx.GraphModule
    weights: dict[str, dict]  # get_attr target -> weight source (msc.checkpoint)
    shapes: dict[str, list[int]]  # get_attr target -> shape in this program
    dtypes: dict[str, str]


def expert_program_name(j: int) -> str:
    return f"{ROLE_EXPERT}.{j}"


@register_pass
class LowerRoles(Pass):
    name = "lower_roles"

    def requires(self, gm, ctx):
        require_ran(gm, "insert_dispatch_combine", self.name)

    def run(self, gm, ctx):
        meta = graph_meta(gm)
        roles, placement = meta["roles"], meta["placement"]
        keys = ctx.checkpoint.keys() if ctx.checkpoint is not None else None
        programs = {ROLE_ATTENTION: self._program(ROLE_ATTENTION, roles[ROLE_ATTENTION], {}, ctx, keys)}
        for j in range(placement["num_nodes"]):
            exp = fx.GraphModule(roles[ROLE_EXPERT], self._copy(roles[ROLE_EXPERT].graph))
            rows = {}
            for n in exp.graph.nodes:
                if is_op(n, "experts"):
                    b = placement["bounds"][n.args[5]]
                    args = list(n.args)
                    args[6] = b[j]
                    n.args = tuple(args)
                    for wnode in expert_weight_nodes(n):  # gate_up, down and any biases: rows of this node's experts
                        rows[wnode.target] = (b[j], b[j + 1])
            exp.recompile()
            programs[expert_program_name(j)] = self._program(expert_program_name(j), exp, rows, ctx, keys)
        meta["programs"] = programs
        params = {name: sum(math.prod(s) for s in p.shapes.values()) for name, p in programs.items()}
        return PassResult(gm, {"programs": sorted(programs), "parameters": params})

    @staticmethod
    def _copy(graph: fx.Graph) -> fx.Graph:
        g = fx.Graph()
        out = g.graph_copy(graph, {})
        g.output(out)
        return g

    @staticmethod
    def _program(role, gm, rows, ctx, keys) -> Program:
        weights, shapes, dtypes = {}, {}, {}
        for target in get_attr_targets(gm.graph):
            t = fetch_attr(gm, target)
            shape = list(t.shape)
            r = rows.get(target)
            if r is not None:
                shape[0] = r[1] - r[0]
            if target in ctx.constants:
                src = {"constant": target}
            else:
                src = ctx.adapter.checkpoint_source(target, keys, ctx.hf_config, r)
                if ctx.checkpoint is not None:
                    have = ctx.checkpoint.source_shape(src)
                    if have != shape:
                        raise MscError(
                            f"checkpoint tensor for '{target}' has shape {have}, the model expects {shape}"
                        )
            weights[target], shapes[target] = src, shape
            dtypes[target] = str(t.dtype).removeprefix("torch.")
        return Program(role, gm, weights, shapes, dtypes)
