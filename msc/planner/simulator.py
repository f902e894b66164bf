"""A discrete-event simulation of MegaScale-Infer's ping-pong pipeline (one attention side, one expert side).

Model (shared/reference/megascale-infer.md, "The method", point 2). One iteration (one decode step) pushes
m micro-batches through L layers; each layer is attention then experts. Per (layer l, micro-batch i):

  * attention task: t_a[l] on the attention side; it may start once micro-batch i's layer l-1 result is
    back at attention (layer 0: at the iteration start) and the attention side is free;
  * its tokens travel to the experts in t_c (the network: neither side's compute is occupied);
  * expert task: t_e[l] on the expert side; it may start once the tokens have arrived and the expert side
    is free;
  * the results travel back in t_c; then micro-batch i's layer l+1 attention is ready.

Each side is a single server, one task at a time, never pre-empted. The attention side is work-conserving:
whenever it is free it starts the ready task that comes first in ping-pong order (layer by layer,
micro-batches 0..m-1 within a layer). The expert side serves arrived tasks first come first served,
ties by micro-batch (then layer). A dense layer (t_e[l] = 0) has no expert task and no communication:
micro-batch i's layer l+1 attention is ready as soon as its layer l attention ends.

NOTE: the end of an iteration is when the last micro-batch's last-layer expert result has arrived back
at the attention side, i.e. the final t_c back is included (after a dense last layer: the end of its
attention). This is the convention under which the reference's whole-batch formula

    T_total = (T_a + T_e + 2*T_c) + T_f * (m*L - 1),    T_f = max(T_a, T_e)

is exact: when m >= 2*(1 + T_c/T_f) the slower side is never idle after its first task, so it runs m*L
tasks back to back, framed by one T_a + T_c before (or T_c + T_e + T_c after) them. This holds for any
T_a, T_e satisfying that condition, not only balanced ones. With fewer micro-batches the sides wait on
each other and the iteration is longer; at m = 1 it is fully serial, L * (T_a + T_e + 2*T_c).
Iterations are back to back and do not overlap: iteration k+1 starts when iteration k's last result is
back (the next decode step needs the previous token).

NOTE: the reference's bounds (T_a + T_e + 2T_c) + m*T_f*(L-1) <= T_iter <= m*T_f*L are about the latency
of one micro-batch through the L layers (first attention start to last result back), not about the whole
batch: T_total exceeds m*T_f*L whenever T_a + T_e + 2T_c > T_f, i.e. always. `SimResult` reports that
per-micro-batch latency (the worst micro-batch) as `microbatch_latency`. The lower bound holds for any m;
the upper bound needs m >= 2*(1 + T_c/T_f) and balanced sides (a fast attention side lets the last
micro-batch start early and then wait on the experts).

Times are in any one unit (seconds unless `to_trace` is told otherwise); results are in that unit.

Public API: ``simulate``, ``SimResult``, ``closed_form_total``, ``iteration_bounds``, ``to_trace``.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from numbers import Real
from typing import Sequence

from msc.errors import MscError

ATTENTION, EXPERT = "attention", "expert"
_PID = {ATTENTION: 0, EXPERT: 1}
_TIME_UNITS = {"s": 1e6, "ms": 1e3, "us": 1.0, "µs": 1.0, "ns": 1e-3}  # -> trace microseconds


@dataclass
class SimResult:
    """What `simulate` found. Fractions are over the last iteration; times in the caller's unit."""

    layers: int
    microbatches: int
    iterations: int
    iteration_time: float  # duration of the last iteration (start to its last result back)
    total_time: float  # all iterations, back to back
    busy_attention: float  # fraction of the last iteration the attention side computes
    busy_expert: float
    idle_attention: float  # 1 - busy_attention
    idle_expert: float
    microbatch_latency: float  # the reference's T_iter: worst micro-batch, first attention start to last result back
    t_c: float
    events: list[tuple[str, int, int, float, float]] = field(repr=False)  # (side, layer, mb, start, end), all iterations
    iteration_starts: list[float] = field(repr=False)  # start time of each iteration
    sends: list[tuple[str, int, int, float, float]] = field(repr=False, default_factory=list)  # (from side, layer, mb, start, end)


# ----------------------------------------------------------------------------------------------------
# validation


def _count(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MscError(f"{name} = {value!r}: expected a positive integer")
    return int(value)


def _time(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
        raise MscError(f"{name} = {value!r}: expected a finite time >= 0")
    return float(value)


def _per_layer(value: object, layers: int, name: str) -> list[float]:
    if isinstance(value, Real) and not isinstance(value, bool):
        return [_time(value, name)] * layers
    if isinstance(value, (str, bytes, bool)) or not hasattr(value, "__len__") or not hasattr(value, "__iter__"):
        raise MscError(f"{name} = {value!r}: expected a time >= 0 or a sequence of {layers} (one per layer)")
    value = list(value)  # a list, tuple or numpy array
    if len(value) != layers:
        raise MscError(f"{name} has {len(value)} entries: expected one per layer ({layers})")
    return [_time(v, f"{name}[{i}]") for i, v in enumerate(value)]


# ----------------------------------------------------------------------------------------------------
# simulation


def _one_iteration(t0: float, layers: int, m: int, ta: list[float], te: list[float], tc: float,
                   shared_link: bool = False):
    """Simulate one iteration from time t0; returns (events, sends, end, per-micro-batch latencies).
    shared_link: each direction of the network carries one transfer at a time (FIFO), as micro-batches in
    flight share its bandwidth; otherwise a transfer is a pure delay."""
    events: list[tuple[str, int, int, float, float]] = []
    sends: list[tuple[str, int, int, float, float]] = []
    pending: list[tuple[float, int, str, int, int]] = []  # (time, seq, kind, layer, mb)
    seq = 0

    def push(t: float, kind: str, layer: int, mb: int) -> None:
        nonlocal seq
        heapq.heappush(pending, (t, seq, kind, layer, mb))
        seq += 1

    ready_a: list[tuple[int, int]] = [(0, i) for i in range(m)]  # heap by ping-pong order (layer, mb)
    heapq.heapify(ready_a)
    queue_e: list[tuple[float, int, int]] = []  # heap by (arrival time, mb, layer): FIFO, ties by mb
    a_busy = e_busy = False
    link_free = {ATTENTION: t0, EXPERT: t0}  # when each direction's link is next free (shared_link)
    first_start = [math.inf] * m

    def send(side: str, layer: int, mb: int, t: float, kind: str) -> None:
        start = max(t, link_free[side]) if shared_link else t
        link_free[side] = start + tc
        sends.append((side, layer, mb, start, start + tc))
        push(start + tc, kind, layer, mb)
    finish = [math.nan] * m
    now = t0

    def layer_done(layer: int, mb: int, t: float) -> None:
        if layer + 1 < layers:
            heapq.heappush(ready_a, (layer + 1, mb))
        else:
            finish[mb] = t

    while True:
        if not a_busy and ready_a:
            layer, mb = heapq.heappop(ready_a)
            end = now + ta[layer]
            events.append((ATTENTION, layer, mb, now, end))
            first_start[mb] = min(first_start[mb], now)
            a_busy = True
            push(end, "a_done", layer, mb)
        if not e_busy and queue_e:
            _, mb, layer = heapq.heappop(queue_e)
            end = now + te[layer]
            events.append((EXPERT, layer, mb, now, end))
            e_busy = True
            push(end, "e_done", layer, mb)
        if not pending:
            break
        now = pending[0][0]
        # NOTE: every event at this instant is handled before either side picks its next task, so that
        # simultaneous arrivals are all visible to the FIFO / ping-pong choice.
        while pending and pending[0][0] == now:
            _, _, kind, layer, mb = heapq.heappop(pending)
            if kind == "a_done":
                a_busy = False
                if te[layer] > 0:
                    send(ATTENTION, layer, mb, now, "at_expert")
                else:
                    layer_done(layer, mb, now)
            elif kind == "at_expert":
                heapq.heappush(queue_e, (now, mb, layer))
            elif kind == "e_done":
                e_busy = False
                send(EXPERT, layer, mb, now, "back")
            else:  # "back": the expert result is at the attention side
                layer_done(layer, mb, now)
    end = max(finish)
    return events, sends, end, [f - s for f, s in zip(finish, first_start)]


def simulate(layers: int, microbatches: int, t_a: float | Sequence[float], t_e: float | Sequence[float],
             t_c: float, iterations: int = 1, shared_link: bool = False) -> SimResult:
    """Simulate `iterations` back-to-back iterations of the ping-pong pipeline (see the module docstring).

    t_a / t_e: one layer's attention / expert compute time for one micro-batch, a number or one per layer
    (t_e = 0 marks a dense layer); t_c: one-way communication time. All in one unit of time.
    shared_link: the network as a third server per direction (one transfer at a time), the planner's model
    (msc.planner.perf.pipeline_total); the default is the reference's, where a transfer is a delay.
    """
    layers = _count(layers, "layers")
    m = _count(microbatches, "microbatches")
    iterations = _count(iterations, "iterations")
    ta = _per_layer(t_a, layers, "t_a")
    te = _per_layer(t_e, layers, "t_e")
    tc = _time(t_c, "t_c")
    if sum(ta) + sum(te) == 0:
        raise MscError("t_a and t_e are zero in every layer: an iteration would take no time")

    events: list[tuple[str, int, int, float, float]] = []
    sends: list[tuple[str, int, int, float, float]] = []
    starts: list[float] = []
    t = 0.0
    for _ in range(iterations):
        starts.append(t)
        ev, sd, end, latencies = _one_iteration(t, layers, m, ta, te, tc, shared_link)
        events += ev
        sends += sd
        last = (t, end, ev)
        t = end
    t_start, t_end, last_events = last
    it = t_end - t_start
    busy = {side: sum(e - s for sd_, _, _, s, e in last_events if sd_ == side) for side in (ATTENTION, EXPERT)}
    busy_a, busy_e = busy[ATTENTION] / it, busy[EXPERT] / it
    return SimResult(
        layers=layers, microbatches=m, iterations=iterations,
        iteration_time=it, total_time=t_end - starts[0],
        busy_attention=busy_a, busy_expert=busy_e, idle_attention=1.0 - busy_a, idle_expert=1.0 - busy_e,
        microbatch_latency=max(latencies), t_c=tc,
        events=events, iteration_starts=starts, sends=sends,
    )


# ----------------------------------------------------------------------------------------------------
# the reference's closed forms


def _scalars(layers: int, m: int, t_a: float, t_e: float, t_c: float) -> tuple[int, int, float, float, float]:
    return (_count(layers, "layers"), _count(m, "m"), _time(t_a, "t_a"), _time(t_e, "t_e"), _time(t_c, "t_c"))


def closed_form_total(layers: int, m: int, t_a: float, t_e: float, t_c: float) -> float:
    """The reference's whole-batch iteration time: (T_a + T_e + 2 T_c) + T_f (m L - 1), T_f = max(T_a, T_e).

    Exact (and equal to `simulate`'s iteration_time) when m >= 2 (1 + T_c / T_f); below that it is optimistic.
    """
    from msc.trace_plot import ideal_step_time  # the same formula, already used for the runtime's traces

    layers, m, t_a, t_e, t_c = _scalars(layers, m, t_a, t_e, t_c)
    return ideal_step_time(t_a, t_e, t_c, m, layers)


def iteration_bounds(layers: int, m: int, t_a: float, t_e: float, t_c: float) -> tuple[float, float]:
    """The reference's bounds on one micro-batch's latency through the L layers:

        (T_a + T_e + 2 T_c) + m T_f (L - 1)  <=  T_iter  <=  m T_f L

    (compare with `SimResult.microbatch_latency`, not with the whole batch's `iteration_time`). The lower
    bound always holds; the upper one needs m >= 2 (1 + T_c / T_f) and balanced sides T_a = T_e. Returns
    (lower, upper); lower <= upper exactly when m T_f >= T_a + T_e + 2 T_c.
    """
    layers, m, t_a, t_e, t_c = _scalars(layers, m, t_a, t_e, t_c)
    t_f = max(t_a, t_e)
    return (t_a + t_e + 2 * t_c) + m * t_f * (layers - 1), m * t_f * layers


# ----------------------------------------------------------------------------------------------------
# trace


def to_trace(result: SimResult, time_unit: str = "s") -> dict:
    """The simulated timeline as a Chrome / Perfetto trace in the runtime's format (msc/runtime/trace.py).

    Two roles, `attention.0` (pid 0) and `expert.0` (pid 1); their compute tasks are `ph: X`, `cat:
    compute` events on tid 0 named like `attention L3 mb1`, args {layer, mb, step}; each iteration is one
    `cat: step` span on the attention role's tid 1 (step = iteration index), so `msc.trace_plot.summarize`
    and `plot_trace` window it like a runtime trace. The transfers are `cat: send` events on one lane per
    micro-batch (tid 2 + mb) of the sending role: trace_plot ignores them, Perfetto shows them.
    time_unit: the unit of the times in `result` ("s", "ms", "us", "ns"); the trace is in microseconds.
    """
    if time_unit not in _TIME_UNITS:
        raise MscError(f"time_unit = {time_unit!r}: expected one of {', '.join(_TIME_UNITS)}")
    us = _TIME_UNITS[time_unit]
    m = result.microbatches
    starts = result.iteration_starts
    ends = starts[1:] + [starts[-1] + result.iteration_time]

    def step_of(t: float) -> int:
        k = 0
        while k + 1 < len(starts) and t >= starts[k + 1]:
            k += 1
        return k

    trace: list[dict] = []
    for side, pid in _PID.items():
        trace += [
            {"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": f"{side}.0"}},
            {"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": pid}},
            {"ph": "M", "name": "thread_name", "pid": pid, "tid": 0, "args": {"name": "work"}},
        ]
        trace += [{"ph": "M", "name": "thread_name", "pid": pid, "tid": 2 + i, "args": {"name": f"send mb{i}"}} for i in range(m)]
    trace.append({"ph": "M", "name": "thread_name", "pid": 0, "tid": 1, "args": {"name": "steps"}})
    for side, layer, mb, start, end in result.events:
        if end > start:  # like the runtime, no zero-length segments
            trace.append({"ph": "X", "name": f"{side} L{layer} mb{mb}", "cat": "compute", "ts": start * us,
                          "dur": (end - start) * us, "pid": _PID[side], "tid": 0,
                          "args": {"layer": layer, "mb": mb, "step": step_of(start)}})
    for side, layer, mb, start, end in result.sends:
        if end > start:
            to = EXPERT if side == ATTENTION else ATTENTION
            trace.append({"ph": "X", "name": f"send L{layer} mb{mb} to {to}", "cat": "send", "ts": start * us,
                          "dur": (end - start) * us, "pid": _PID[side], "tid": 2 + mb,
                          "args": {"layer": layer, "mb": mb, "step": step_of(start)}})
    for k, (lo, hi) in enumerate(zip(starts, ends)):
        trace.append({"ph": "X", "name": f"step {k}", "cat": "step", "ts": lo * us, "dur": (hi - lo) * us,
                      "pid": 0, "tid": 1, "args": {"step": k, "microbatches": m}})
    metadata = {"source": "msc.planner.simulator", "layers": result.layers, "microbatches": m,
                "iterations": result.iterations, "iteration_time": result.iteration_time, "time_unit": time_unit}
    return {"traceEvents": trace, "displayTimeUnit": "ms", "metadata": metadata}
