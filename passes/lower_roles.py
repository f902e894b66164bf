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


def expert_rows_source(adapter, target: str, keys, hf_config, experts: list[int], moved: bool = False) -> dict:
    """The weight source of rows `experts` (in this order, repeats allowed: replicas) of a stacked experts
    parameter: one source per run of consecutive experts from the adapter, joined. moved (a placement other
    than expert e in slot e): the source also names the experts, which random weights seed each row by."""
    runs: list[list[int]] = []
    for e in experts:
        if runs and e == runs[-1][1]:
            runs[-1][1] = e + 1
        else:
            runs.append([e, e + 1])
    parts = [adapter.checkpoint_source(target, keys, hf_config, (a, b)) for a, b in runs]
    if len(parts) == 1:
        src = dict(parts[0])
    elif all(set(p) == {"stack"} for p in parts):
        src = {"stack": [g for p in parts for g in p["stack"]]}
    elif all(set(p) == {"key", "rows"} for p in parts):
        src = {"cat": [{"key": p["key"], "rows": p["rows"]} for p in parts]}
    else:
        raise MscError(f"'{target}': experts {experts} come from checkpoint sources msc cannot join ({parts[0]})")
    if moved:
        src["experts"] = list(experts)
    return src


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
                    layer = n.args[5]
                    b = placement["bounds"][layer]
                    slots = placement.get("slots", {}).get(layer) or list(range(b[-1]))
                    moved = slots != list(range(len(slots)))
                    args = list(n.args)
                    args[6] = b[j]  # its first slot: the dispatch sends slot ids (msc::expert_slots)
                    n.args = tuple(args)
                    for wnode in expert_weight_nodes(n):  # gate_up, down and any biases: rows of this node's experts
                        rows[wnode.target] = (slots[b[j]:b[j + 1]], moved)
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
            experts, moved = rows.get(target, (None, False))
            if experts is not None:
                shape[0] = len(experts)
            if target in ctx.constants:
                src = {"constant": target}
            elif experts is not None:
                src = expert_rows_source(ctx.adapter, target, keys, ctx.hf_config, experts, moved)
            else:
                src = ctx.adapter.checkpoint_source(target, keys, ctx.hf_config, None)
                if ctx.checkpoint is not None:
                    have = ctx.checkpoint.source_shape(src)
                    if have != shape:
                        raise MscError(
                            f"checkpoint tensor for '{target}' has shape {have}, the model expects {shape}"
                        )
            weights[target], shapes[target] = src, shape
            dtypes[target] = str(t.dtype).removeprefix("torch.")
        return Program(role, gm, weights, shapes, dtypes)
