"""A role program cut into stages, run one stage of one micro-batch at a time (the ping-pong pipeline).

The `pipeline_microbatches` pass stamps every node with `meta["msc"]["stage"]`:

  attention program   stage 0: embed … layer 0 attention, router, dispatch(0)
                      stage s: combine(s-1), residual, layer s attention, router, dispatch(s)
                      stage L: combine(L-1), final norm, lm head
  expert program      stage k: expert_recv(l_k), experts(l_k), expert_send(l_k)   (k-th MoE layer l_k)

Here the annotated graph is cut with torch.fx's `split_module` into one submodule per stage, and each
micro-batch keeps its own environment of live values, so stage s of micro-batch 1 can run while
micro-batch 0 is away at the experts. The order in which (stage, micro-batch) pairs run is the
schedule (`ping_pong`); communication inside the stages is non-blocking up to the combine's wait.
"""
from __future__ import annotations

import bisect
import itertools
from typing import Any

import torch.fx as fx
from torch.fx.passes.split_module import split_module

from msc.errors import MscError
from msc.ir import fetch_attr

STAGE_KEY = "stage"


def ping_pong(num_stages: int, microbatches: int) -> list[tuple[int, int]]:
    """The attention side's order: every micro-batch through stage s before any enters stage s + 1.

    Stage s of micro-batch i ends by dispatching layer s; stage s + 1 of micro-batch i begins by
    combining it. Running the other micro-batches' stage s in between is what hides micro-batch i's
    trip to the experts (MegaScale-Infer's ping-pong pipeline).
    """
    return [(s, mb) for s in range(num_stages) for mb in range(microbatches)]


def split_microbatches(lengths: list[int], microbatches: int) -> list[range]:
    """Cut sequences (with `lengths` tokens each, in order) into at most `microbatches` contiguous,
    non-empty groups of about equal token counts. Keeping the order keeps every request's outputs
    where they were."""
    n = len(lengths)
    m = max(1, min(microbatches, n))
    cum = list(itertools.accumulate(lengths))  # cum[j] = tokens of sequences 0..j
    total = cum[-1] if cum else 0
    bounds = [0]
    for k in range(1, m):
        j = bisect.bisect_left(cum, total * k / m) + 1  # first cut with at least k/m of the tokens before it
        j = min(max(j, bounds[-1] + 1), n - (m - k))
        bounds.append(j)
    bounds.append(n)
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


class StagedProgram:
    """One role's program as stage submodules plus the glue that runs them per micro-batch."""

    def __init__(self, gm: fx.GraphModule):
        stage_of = {}
        for n in gm.graph.nodes:
            if n.op == "call_function":
                s = n.meta.get("msc", {}).get(STAGE_KEY)
                if s is None:
                    raise MscError(f"node {n.name} of the program has no pipeline stage; compile with the "
                                   "pipeline_microbatches pass (in the default pipeline) to run micro-batches")
                stage_of[n.name] = s
        # layers whose work each stage holds (for traces and for the expert side's schedule)
        layers: dict[int, set[int]] = {}
        for n in gm.graph.nodes:
            layer = n.meta.get("msc", {}).get("layer")
            if n.op == "call_function" and layer is not None:
                layers.setdefault(stage_of[n.name], set()).add(layer)
        self.num_stages = max(stage_of.values(), default=0) + 1
        self.stage_layers = [sorted(layers.get(s, ())) for s in range(self.num_stages)]
        self.root = split_module(gm, gm, lambda node: stage_of[node.name])
        self._inputs: list[fx.Node] = []
        self._shared: dict[fx.Node, Any] = {}  # get_attr values: the same weights for every micro-batch
        self._stage_nodes: list[list[fx.Node]] = [[] for _ in range(self.num_stages)]
        self._output: fx.Node | None = None
        stage_of_call: dict[fx.Node, int] = {}
        self.weight_args: list[set[int]] = [set() for _ in range(self.num_stages)]  # stage inputs that are weights
        for n in self.root.graph.nodes:
            if n.op == "placeholder":
                self._inputs.append(n)
            elif n.op == "get_attr":
                self._shared[n] = fetch_attr(self.root, n.target)
            elif n.op == "call_module":
                s = int(n.target.removeprefix("submod_"))
                stage_of_call[n] = s
                self._stage_nodes[s].append(n)
                self.weight_args[s] = {i for i, a in enumerate(n.args) if isinstance(a, fx.Node) and a.op == "get_attr"}
            elif n.op == "call_function":  # getitem unpacking a stage's outputs
                src = n.args[0]
                self._stage_nodes[stage_of_call[src]].append(n)
            elif n.op == "output":
                self._output = n

    def start(self, *inputs) -> dict:
        """A fresh environment for one micro-batch, bound to the program's inputs."""
        if len(inputs) != len(self._inputs):
            raise MscError(f"program takes {len(self._inputs)} inputs, got {len(inputs)}")
        env = dict(self._shared)
        env.update(zip(self._inputs, inputs))
        return env

    def run_stage(self, stage: int, env: dict, call=None) -> None:
        """Run stage `stage` on a micro-batch's env; `call(stage, args)`, if given, runs the stage's submodule
        in place of calling it (msc.engine.stage_graphs replays its captured segments)."""
        for n in self._stage_nodes[stage]:
            args = fx.node.map_arg(n.args, env.__getitem__)
            kwargs = fx.node.map_arg(n.kwargs, env.__getitem__)
            if n.op == "call_module" and call is not None and not kwargs:
                env[n] = call(stage, args)
                continue
            fn = getattr(self.root, n.target) if n.op == "call_module" else n.target
            env[n] = fn(*args, **kwargs)

    def output(self, env: dict):
        return fx.node.map_arg(self._output.args[0], env.__getitem__)
