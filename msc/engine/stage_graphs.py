"""CUDA graphs for an attention role's stages: the compute between its communication ops, per batch bucket.

An attention stage is `combine(layer - 1) → residual, norms, attention, router → dispatch(layer)`. The two
ends talk to the expert nodes from the host (dispatch picks each node's tokens), so a stage cannot be one
graph; the compute between them can. Each stage submodule is cut into segments: runs of nodes between
`msc::combine` / `msc::dispatch` calls. A segment is captured once per batch bucket with static inputs
(the weights are used in place; activations are copied in) and replayed; its outputs are cloned out,
because the next micro-batch replays the same graph. `msc::attention` inside a segment reads the static
step metadata of the bucket, which the runner refreshes (in place) before each replay.

`emulate=True` runs the same bookkeeping without CUDA (the segment function on the static buffers), so
the CPU tests check everything but the capture itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from msc.ops import is_op
from msc.runtime import context


@dataclass
class _Segment:
    nodes: list[fx.Node]
    inputs: list[fx.Node]  # values made outside the segment that it reads
    outputs: list[fx.Node]  # values it makes that are read after it


@dataclass
class _Captured:
    static_in: dict[fx.Node, Any]
    static_out: dict[fx.Node, Any] = field(default_factory=dict)
    graph: Any = None  # torch.cuda.CUDAGraph, or None when emulated


def _segments(sub: fx.GraphModule) -> list:
    """The stage's nodes as a list of ("node", node) for communication / bookkeeping and ("seg", _Segment)."""
    items: list = []
    run: list[fx.Node] = []
    for n in sub.graph.nodes:
        if n.op == "call_function" and not (is_op(n, "combine") or is_op(n, "dispatch")):
            run.append(n)
            continue
        if run:
            items.append(("seg", run))
            run = []
        if n.op in ("call_function", "output"):
            items.append(("node", n))
    if run:
        items.append(("seg", run))
    out = []
    for kind, x in items:
        if kind == "node":
            out.append((kind, x))
            continue
        inside = set(x)
        inputs = list(dict.fromkeys(a for n in x for a in n.all_input_nodes if a not in inside))
        outputs = [n for n in x if any(u not in inside for u in n.users)]
        out.append(("seg", _Segment(x, inputs, outputs)))
    return out


def _run_nodes(nodes: list[fx.Node], env: dict) -> None:
    for n in nodes:
        env[n] = n.target(*fx.node.map_arg(n.args, env.__getitem__), **fx.node.map_arg(n.kwargs, env.__getitem__))


class StageGraphs:
    """Runs an attention program's stage submodules node by node, replaying captured segments."""

    def __init__(self, root: fx.GraphModule, num_stages: int, weight_args: list[set[int]], runner, *, emulate: bool):
        self.runner, self.emulate = runner, emulate
        self.subs = [getattr(root, f"submod_{s}") for s in range(num_stages)]
        self.plans = [_segments(sub) for sub in self.subs]
        self.placeholders = [[n for n in sub.graph.nodes if n.op == "placeholder"] for sub in self.subs]
        self.weight_args = weight_args  # per stage: indices of its inputs that are weights (used in place)
        self._captured: dict[tuple[int, int, int], _Captured] = {}

    def call(self, stage: int, args: tuple, bucket: int):
        """The stage submodule's result for these inputs (a decode micro-batch padded to `bucket`)."""
        env: dict[fx.Node, Any] = {}
        weights = self.weight_args[stage]
        static_nodes = set()
        for i, (ph, a) in enumerate(zip(self.placeholders[stage], args)):
            env[ph] = a
            if i in weights:
                static_nodes.add(ph)
        for k, (kind, x) in enumerate(self.plans[stage]):
            if kind == "node":
                if x.op == "output":
                    return fx.node.map_arg(x.args[0], env.__getitem__)
                _run_nodes([x], env)
                continue
            cap = self._captured.get((stage, k, bucket))
            if cap is None:
                cap = self._capture(x, env, static_nodes)
                self._captured[(stage, k, bucket)] = cap
            else:
                for n in x.inputs:
                    v = env[n]
                    if n in static_nodes or not isinstance(v, torch.Tensor):
                        continue
                    cap.static_in[n].copy_(v)
                self._replay(x, cap)
            for n in x.outputs:
                env[n] = cap.static_out[n].clone() if isinstance(cap.static_out[n], torch.Tensor) else cap.static_out[n]
        raise AssertionError("a stage submodule without an output node")

    # ------------------------------------------------------------------ capture / replay
    def _fn(self, seg: _Segment, cap: _Captured) -> Callable[[], None]:
        def run() -> None:
            env = dict(cap.static_in)
            with context.use(self.runner), torch.no_grad():
                _run_nodes(seg.nodes, env)
            cap.static_out = {n: env[n] for n in seg.outputs}
        return run

    def _capture(self, seg: _Segment, env: dict, static_nodes: set) -> _Captured:
        static_in = {}
        for n in seg.inputs:
            v = env[n]
            static_in[n] = v if n in static_nodes or not isinstance(v, torch.Tensor) else v.clone()
        cap = _Captured(static_in)
        run = self._fn(seg, cap)
        if self.emulate:
            run()
            return cap
        # NOTE: the warm-up computes this very micro-batch (its K/V writes are the ones the replay repeats)
        cap.graph = self.runner.capture(run, warmups=1)
        cap.graph.replay()
        return cap

    def _replay(self, seg: _Segment, cap: _Captured) -> None:
        if cap.graph is None:
            self._fn(seg, cap)()
        else:
            cap.graph.replay()
