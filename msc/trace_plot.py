"""Read a run's Chrome/Perfetto trace, summarise how idle each role was, and draw it as a lane chart.

The runtime writes one trace JSON per run (it also opens in chrome://tracing and ui.perfetto.dev):

    {"traceEvents": [...], "displayTimeUnit": "ms", "metadata": {"microbatches": 3, ...}}

  * ``ph: "M"`` events name each process: ``pid`` = rank, ``args.name`` = ``attention.N`` / ``expert.N``.
  * ``ph: "X"`` events on ``tid 0`` are a role's work lane: flat, non-overlapping segments with
    ``cat`` in {compute, send, recv, wait}; time covered by no segment is idle.
  * ``ph: "X"`` events on ``tid 1`` (attention roles only, ``cat: "step"``) mark one forward each:
    step 0 is prefill, steps >= 1 are decode steps.

All ``ts``/``dur`` are microseconds on one clock shared by every pid; everything this module returns is
in seconds (``summarize``) or drawn in milliseconds (``plot_trace``).

Public API: ``load_trace``, ``summarize``, ``plot_trace``, ``figure_size``, ``ideal_step_time``.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from msc.errors import MscError

CATEGORIES = ("compute", "send", "recv", "wait")
CATEGORY_COLORS = {  # bar colours (hex RGB); idle gaps stay white
    "compute": "#3b6fb6",
    "send": "#3aa35b",
    "recv": "#8e5bb5",
    "wait": "#e08a3c",
}
SIDES = ("attention", "expert")

DPI = 100
_FIG_WIDTH_IN = 12.0
_LANE_IN = 0.5  # inches of height per role lane
_TOP_IN, _BOTTOM_IN = 1.15, 0.55  # room for title + subtitle lines / x axis label
_LEFT_IN, _RIGHT_IN = 1.1, 1.5  # room for role names / the legend
_LABEL_FONT_PT = 7.0
_US = 1e-6  # seconds per trace microsecond


# ----------------------------------------------------------------------------------------------------
# loading


def load_trace(path: str | os.PathLike) -> dict:
    """Read a trace JSON file and check its outline; raise MscError naming the file if it is not one."""
    p = Path(path)
    expected = 'a Chrome trace JSON object with a "traceEvents" list'
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise MscError(f"trace file {p} does not exist (expected {expected})") from None
    except OSError as e:
        raise MscError(f"cannot read trace file {p}: {e.strerror or e} (expected {expected})") from None
    try:
        trace = json.loads(text)
    except json.JSONDecodeError as e:
        raise MscError(f"trace file {p} is not valid JSON (line {e.lineno}: {e.msg}); expected {expected}") from None
    if not isinstance(trace, dict) or not isinstance(trace.get("traceEvents"), list):
        raise MscError(f"trace file {p} has no traceEvents list; expected {expected}")
    for i, ev in enumerate(trace["traceEvents"]):
        _check_event(ev, i, p)
    return trace


def _check_event(ev: object, i: int, path: Path) -> None:
    if not isinstance(ev, dict):
        raise MscError(f"trace file {path}: traceEvents[{i}] is not an object")
    if ev.get("ph") == "X":
        for key in ("ts", "dur"):
            if not isinstance(ev.get(key), (int, float)) or isinstance(ev.get(key), bool):
                raise MscError(f"trace file {path}: traceEvents[{i}] (ph X) has no numeric {key!r}")


# ----------------------------------------------------------------------------------------------------
# parsing into roles, segments and steps


@dataclass(frozen=True)
class _Seg:
    """One tid-0 segment, in trace microseconds."""

    start: float
    end: float
    cat: str
    layer: int | None
    mb: int | None


@dataclass
class _Role:
    pid: int
    name: str
    side: str  # "attention" | "expert" | "other"
    index: int  # N in attention.N / expert.N (sort key within a side)
    segs: list[_Seg]


@dataclass
class _Analysis:
    """What summarize and plot_trace share: the roles, the chosen steps and the window they span."""

    roles: list[_Role]  # attention roles first, then expert roles, then anything else
    steps: list[int]  # chosen step numbers, ascending
    step_bounds: dict[int, tuple[float, float]]  # step -> (earliest start, latest end) across attention roles, µs
    step_durs: dict[int, float]  # step -> max duration across attention roles, µs
    window: list[tuple[float, float]]  # merged, sorted intervals (µs) whose union is the window


def _side_of(name: str) -> tuple[str, int]:
    side, _, idx = name.partition(".")
    if side in SIDES and idx.isdigit():
        return side, int(idx)
    return "other", 0


def _parse(trace: dict) -> tuple[list[_Role], dict[int, list[tuple[float, float]]]]:
    """Roles (with their tid-0 segments, sorted by start) and step -> [(start, end) per attention role]."""
    events = trace.get("traceEvents")
    if not isinstance(events, list):
        raise MscError('trace has no "traceEvents" list')
    names: dict[int, str] = {}
    segs: dict[int, list[_Seg]] = {}
    steps: dict[int, list[tuple[float, float]]] = {}
    for ev in events:
        if not isinstance(ev, dict):
            continue
        pid = ev.get("pid")
        if ev.get("ph") == "M" and ev.get("name") == "process_name":
            names[pid] = str((ev.get("args") or {}).get("name", f"pid{pid}"))
        elif ev.get("ph") == "X":
            start = float(ev["ts"])
            end = start + float(ev["dur"])
            args = ev.get("args") or {}
            if ev.get("tid", 0) == 0:
                segs.setdefault(pid, []).append(_Seg(start, end, str(ev.get("cat")), args.get("layer"), args.get("mb")))
            elif ev.get("cat") == "step" and isinstance(args.get("step"), int):
                steps.setdefault(args["step"], []).append((start, end))
    roles = []
    for pid in sorted(set(names) | set(segs), key=lambda p: (str(type(p)), p)):
        name = names.get(pid, f"pid{pid}")
        side, idx = _side_of(name)
        roles.append(_Role(pid, name, side, idx, sorted(segs.get(pid, []), key=lambda s: s.start)))
    order = {s: i for i, s in enumerate((*SIDES, "other"))}
    roles.sort(key=lambda r: (order[r.side], r.index, r.name))
    return roles, steps


def _merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for lo, hi in sorted(intervals):
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def _overlap(start: float, end: float, window: list[tuple[float, float]]) -> float:
    """Length of [start, end] inside the union of `window` (same units)."""
    return sum(max(0.0, min(end, hi) - max(start, lo)) for lo, hi in window)


def _analyse(trace: dict, steps: list[int] | None) -> _Analysis:
    roles, all_steps = _parse(trace)
    if not roles:
        raise MscError("trace has no roles (no process_name metadata and no tid-0 events)")
    if steps is None:
        # NOTE: by default the window is the decode steps only: prefill (step 0) has a different shape
        # (long prompts, one pass) and would dominate the idle numbers of a short run.
        chosen = sorted(s for s in all_steps if s >= 1) or sorted(all_steps)
    else:
        missing = sorted(set(steps) - set(all_steps))
        if missing:
            have = ", ".join(map(str, sorted(all_steps))) or "none"
            raise MscError(f"step(s) {', '.join(map(str, missing))} not in the trace (steps present: {have})")
        chosen = sorted(set(steps))
    bounds = {s: (min(lo for lo, _ in all_steps[s]), max(hi for _, hi in all_steps[s])) for s in chosen}
    durs = {s: max(hi - lo for lo, hi in all_steps[s]) for s in chosen}
    if chosen:
        window = _merge(list(bounds.values()))
    else:
        # NOTE: a trace without step events (e.g. a run that died in prefill) is summarised over the whole
        # extent of its tid-0 events, so that it can still be looked at.
        segs = [s for r in roles for s in r.segs]
        if not segs:
            raise MscError("trace has neither step events nor work events: nothing to summarise")
        window = [(min(s.start for s in segs), max(s.end for s in segs))]
    if sum(hi - lo for lo, hi in window) <= 0:
        raise MscError(f"the chosen steps {chosen} span no time: cannot compute idle fractions")
    return _Analysis(roles, chosen, bounds, durs, window)


# ----------------------------------------------------------------------------------------------------
# summary


def summarize(trace: dict, steps: list[int] | None = None) -> dict:
    """Busy/idle time per role over the window of the chosen attention steps.

    steps: step numbers (tid-1 ``args.step``) to cover; default all decode steps (>= 1), or all steps if
    the trace has no decode step. The window is the union over chosen steps of [earliest start, latest
    end] across attention roles; segments are clipped to it, and gaps between segments count as idle.

    Returns (all times in seconds):
      {"steps": [int], "window_s": float, "step_s": [float per chosen step, max over attention roles],
       "roles": {name: {"role", "side", "busy_s", "idle_fraction", "send_s", "recv_s", "wait_s"}},
       "sides": {"attention": mean idle fraction | None, "expert": mean idle fraction | None}}
    """
    a = _analyse(trace, steps)
    window_us = sum(hi - lo for lo, hi in a.window)
    roles: dict[str, dict] = {}
    for r in a.roles:
        per_cat = dict.fromkeys(CATEGORIES, 0.0)  # category -> µs inside the window
        for s in r.segs:
            if s.cat in per_cat:
                per_cat[s.cat] += _overlap(s.start, s.end, a.window)
        roles[r.name] = {
            "role": r.name,
            "side": r.side,
            "busy_s": per_cat["compute"] * _US,
            "idle_fraction": 1.0 - per_cat["compute"] / window_us,
            "send_s": per_cat["send"] * _US,
            "recv_s": per_cat["recv"] * _US,
            "wait_s": per_cat["wait"] * _US,
        }
    sides: dict[str, float | None] = {}
    for side in SIDES:
        idle = [v["idle_fraction"] for v in roles.values() if v["side"] == side]
        sides[side] = sum(idle) / len(idle) if idle else None
    return {
        "steps": list(a.steps),
        "window_s": window_us * _US,
        "step_s": [a.step_durs[s] * _US for s in a.steps],
        "roles": roles,
        "sides": sides,
    }


# ----------------------------------------------------------------------------------------------------
# plot


def figure_size(n_lanes: int) -> tuple[float, float]:
    """(width, height) in inches of the lane chart for `n_lanes` roles (pixels = inches * DPI)."""
    return _FIG_WIDTH_IN, _TOP_IN + _BOTTOM_IN + _LANE_IN * max(1, n_lanes)


def _seg_label(seg: _Seg, width_px: float) -> str | None:
    """The longest of "L1·m0" / "m0" that fits inside a bar `width_px` wide, or None."""
    candidates = []
    if seg.mb is not None:
        if seg.layer is not None:
            candidates.append(f"L{seg.layer}·m{seg.mb}")
        candidates.append(f"m{seg.mb}")
    char_px = _LABEL_FONT_PT * 0.62 * DPI / 72  # rough width of one character of the label font
    for text in candidates:
        if len(text) * char_px + 4 <= width_px:
            return text
    return None


def _side_line(side: str, summary: dict) -> str | None:
    idle = summary["sides"].get(side)
    if idle is None:
        return None
    n = sum(1 for v in summary["roles"].values() if v["side"] == side)
    return f"{side}: idle {idle:.1%} (mean of {n} role{'s' if n != 1 else ''})"


def plot_trace(trace: dict, out_png: str | os.PathLike, *, steps: list[int] | None = None, title: str | None = None) -> None:
    """Draw one lane per role over the chosen steps' window and write it to `out_png` (atomically).

    x: milliseconds from the window start; bars coloured by category (idle left white); compute bars carry
    their micro-batch ("m0" or "L1·m0" when it fits); thin vertical lines mark step boundaries.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    out = Path(out_png)
    if not out.parent.is_dir():
        raise MscError(f"cannot write plot {out}: directory {out.parent} does not exist")
    a = _analyse(trace, steps)
    summary = summarize(trace, steps)
    t0, t1 = a.window[0][0], a.window[-1][1]  # µs
    span_ms = (t1 - t0) / 1e3

    w_in, h_in = figure_size(len(a.roles))
    # NOTE: a plain Figure (not pyplot) so that plotting keeps no global state and needs no close().
    fig = Figure(figsize=(w_in, h_in), dpi=DPI)
    fig.subplots_adjust(left=_LEFT_IN / w_in, right=1 - _RIGHT_IN / w_in, bottom=_BOTTOM_IN / h_in, top=1 - _TOP_IN / h_in)
    ax = fig.add_subplot()
    px_per_ms = (w_in - _LEFT_IN - _RIGHT_IN) * DPI / span_ms

    for lane, role in enumerate(a.roles):
        for cat in CATEGORIES:
            bars = [(max(s.start, t0), min(s.end, t1)) for s in role.segs if s.cat == cat and s.end > t0 and s.start < t1]
            xr = [((lo - t0) / 1e3, (hi - lo) / 1e3) for lo, hi in bars if hi > lo]
            if xr:
                ax.broken_barh(xr, (lane - 0.35, 0.7), facecolors=CATEGORY_COLORS[cat], edgecolor="none")
        for s in role.segs:
            if s.cat != "compute" or s.end <= t0 or s.start >= t1:
                continue
            lo, hi = (max(s.start, t0) - t0) / 1e3, (min(s.end, t1) - t0) / 1e3
            text = _seg_label(s, (hi - lo) * px_per_ms)
            if text:
                ax.text((lo + hi) / 2, lane, text, ha="center", va="center", fontsize=_LABEL_FONT_PT, color="white")

    # Gaps between non-adjacent chosen steps are outside the window: shade them so it is visible.
    for (_, hi), (lo, _) in zip(a.window, a.window[1:]):
        ax.axvspan((hi - t0) / 1e3, (lo - t0) / 1e3, color="0.93", zorder=0)
    bounds = sorted({x for s in a.steps for x in a.step_bounds[s]})
    for x in bounds:
        ax.axvline((x - t0) / 1e3, color="0.45", linewidth=0.6, linestyle="--", zorder=3)
    for s in a.steps:
        lo, hi = a.step_bounds[s]
        if (hi - lo) / 1e3 * px_per_ms >= 24:  # label a step only if there is room
            ax.text((lo + hi - 2 * t0) / 2e3, 1.01, f"s{s}", transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=7, color="0.35")

    ax.set_xlim(0, span_ms)
    ax.set_ylim(len(a.roles) - 0.5, -0.5)  # lane 0 (first attention role) on top
    ax.set_yticks(range(len(a.roles)), [r.name for r in a.roles])
    ax.set_xlabel("time from window start (ms)")
    ax.set_facecolor("white")
    fig.legend(handles=[Patch(color=CATEGORY_COLORS[c], label=c) for c in CATEGORIES] + [Patch(facecolor="white", edgecolor="0.5", label="idle")],
               loc="center right", fontsize=8, frameon=False)
    if title is None:
        mb = (trace.get("metadata") or {}).get("microbatches")
        step_txt = f"steps {a.steps[0]}–{a.steps[-1]}" if a.steps else "whole trace"
        mean_step = f", mean step {1e3 * sum(summary['step_s']) / len(summary['step_s']):.2f} ms" if summary["step_s"] else ""
        title = f"msc trace: {step_txt}{mean_step}" + (f", {mb} micro-batches" if mb is not None else "")
    fig.suptitle(title, y=1 - 0.1 / h_in, va="top", fontsize=11)
    lines = [line for side in SIDES if (line := _side_line(side, summary))]
    fig.text(0.5, 1 - 0.42 / h_in, "\n".join(lines), ha="center", va="top", fontsize=9, color="0.25")
    _save_atomic(fig, out)


def _save_atomic(fig, out: Path) -> None:
    """Save `fig` as PNG to a temp file beside `out`, then rename it over `out`: never a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, out)
    except OSError as e:
        raise MscError(f"cannot write plot {out}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ----------------------------------------------------------------------------------------------------
# model


def ideal_step_time(t_a: float, t_e: float, t_c: float, m: int, layers: int) -> float:
    """Ideal time of one forward step under ping-pong pipelining (MegaScale-Infer).

    From shared/reference/megascale-infer.md, section "Ping-pong pipeline":

        T_total = (T_a + T_e + 2 * T_c) + T_f * (m * L - 1),   T_f = max(T_a, T_e)

    t_a / t_e: attention / expert compute time of one micro-batch for one layer; t_c: one-way
    communication time; m: micro-batches; layers: L. Times in any one unit; the result is in that unit.
    The first micro-batch pays the full attention → send → experts → send latency once; afterwards the
    slower side sets the pace for the remaining m*L - 1 (micro-batch, layer) slots.

    NOTE: the formula assumes a full pipeline, m >= 2 * (1 + T_c / T_f). With fewer micro-batches a side
    waits for the other: at m = 1 a step takes L * (T_a + T_e + 2 * T_c), more than this returns.
    """
    if m < 1 or layers < 1:
        raise MscError(f"ideal_step_time needs m >= 1 and layers >= 1 (got m={m}, layers={layers})")
    if min(t_a, t_e, t_c) < 0:
        raise MscError(f"ideal_step_time needs non-negative times (got t_a={t_a}, t_e={t_e}, t_c={t_c})")
    t_f = max(t_a, t_e)
    return (t_a + t_e + 2 * t_c) + t_f * (m * layers - 1)
