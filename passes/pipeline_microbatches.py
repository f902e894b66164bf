"""pipeline_microbatches: cut every role program into stages and fix the ping-pong order of their work.

Before (attention):  embed → [attn_0 → router_0 → dispatch_0 → combine_0] → [attn_1 … combine_1] → head
After:               the same graph, each node stamped with meta["msc"]["stage"]:
                       stage 0 = embed … dispatch_0 · stage 1 = combine_0 … dispatch_1 · stage 2 = combine_1 … head
Before (expert):     recv_0 → experts_0 → send_0 → recv_1 → experts_1 → send_1
After:               stage k = recv/experts/send of the k-th MoE layer
and gm.meta["msc"]["pipeline"] = {microbatches m, stages per program, schedule}.

A node's stage is the latest stage among its inputs; a combine opens the stage after its dispatch's,
and an expert_recv opens the next expert stage. So every stage ends with at most one send whose reply
the next stage waits for, and the runtime (msc/runtime/staged.py) can run stage s of micro-batch
i + 1 while micro-batch i is at the experts: for s in stages, for i in micro-batches (ping-pong).

NOTE: the cut is recorded as annotations rather than by rewriting the program into m copies: the stages
do not depend on m, so one bundle runs with any m (the plan's, or a run-time override), and a step
with fewer sequences than m simply runs fewer micro-batches.
"""
from __future__ import annotations

import torch.fx as fx

from msc.errors import MscError
from msc.ir import ROLE_ATTENTION, graph_meta, node_meta
from msc.ops import is_op
from msc.pass_manager import Pass, PassResult, register_pass, require_ran
from msc.runtime.staged import STAGE_KEY, ping_pong


def stage_attention(graph: fx.Graph) -> int:
    """Stamp the attention program's nodes with stages; returns the number of stages."""
    stage: dict[fx.Node, int] = {}
    for n in graph.nodes:
        if n.op in ("placeholder", "get_attr"):
            stage[n] = 0
            continue
        s = max((stage[a] for a in n.all_input_nodes if a.op != "get_attr"), default=0)
        if is_op(n, "combine"):
            s = stage[n.args[0]] + 1  # the ticket comes from this layer's dispatch
        stage[n] = s
        if n.op == "call_function":
            node_meta(n)[STAGE_KEY] = s
    return max(stage.values(), default=0) + 1


def stage_expert(graph: fx.Graph) -> int:
    """Stamp the expert program's nodes with stages (one per MoE layer); returns the number of stages."""
    stage: dict[fx.Node, int] = {}
    opened = -1
    for n in graph.nodes:
        if n.op in ("placeholder", "get_attr"):
            stage[n] = 0
            continue
        if is_op(n, "expert_recv"):
            opened += 1
            s = opened
        else:
            s = max((stage[a] for a in n.all_input_nodes if a.op != "get_attr"), default=max(opened, 0))
        stage[n] = s
        if n.op == "call_function":
            node_meta(n)[STAGE_KEY] = s
    return max(opened + 1, 1)


def check_stages(graph: fx.Graph, role: str) -> None:
    """Each stage sends at most once, and every combine/recv runs in the stage after its send."""
    sends: dict[int, int] = {}
    for n in graph.nodes:
        if is_op(n, "dispatch") or is_op(n, "expert_send"):
            s, layer = node_meta(n)[STAGE_KEY], n.args[3] if is_op(n, "dispatch") else n.args[1]
            if s in sends:
                raise MscError(f"{role} program: stage {s} holds two sends (layers {sends[s]} and {layer}); "
                               "the ping-pong schedule needs one exchange per stage")
            sends[s] = layer
        if is_op(n, "combine") and node_meta(n)[STAGE_KEY] != node_meta(n.args[0])[STAGE_KEY] + 1:
            raise MscError(f"{role} program: combine of layer {n.args[2]} is not in the stage after its dispatch")


@register_pass
class PipelineMicrobatches(Pass):
    name = "pipeline_microbatches"

    def requires(self, gm, ctx):
        require_ran(gm, "lower_roles", self.name)

    def run(self, gm, ctx):
        programs = graph_meta(gm)["programs"]
        stages = {}
        for name, prog in programs.items():
            g = prog.gm.graph
            stages[name] = stage_attention(g) if name == ROLE_ATTENTION else stage_expert(g)
            check_stages(g, name)
        m = ctx.plan.microbatches
        graph_meta(gm)["pipeline"] = {
            "microbatches": m,
            "stages": stages,
            "schedule": "ping-pong: for each stage, every micro-batch in order",
            "attention_order": [list(p) for p in ping_pong(stages[ROLE_ATTENTION], m)],
        }
        return PassResult(gm, {"microbatches": m, "stages": stages})

    def ensures(self, gm, ctx):
        for name, prog in graph_meta(gm)["programs"].items():
            missing = [n.name for n in prog.gm.graph.nodes if n.op == "call_function" and STAGE_KEY not in node_meta(n)]
            if missing:
                raise MscError(f"pipeline_microbatches left {len(missing)} nodes of {name} without a stage: {missing[:3]}")
