"""msc.trace_plot on hand-built traces: idle fractions by hand, the ping-pong formula, the PNG, bad files."""
from __future__ import annotations

import json

import matplotlib.colors as mcolors
import matplotlib.image as mimage
import numpy as np
import pytest

from msc import trace_plot
from msc.errors import MscError
from msc.trace_plot import ideal_step_time, load_trace, plot_trace, summarize

MS = 1000.0  # trace microseconds per millisecond


def _meta(pid: int, name: str) -> list[dict]:
    return [
        {"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": name}},
        {"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": pid}},
    ]


def _seg(pid: int, cat: str, lo_ms: float, hi_ms: float, layer=None, mb=None) -> dict:
    return {"ph": "X", "name": cat, "cat": cat, "ts": lo_ms * MS, "dur": (hi_ms - lo_ms) * MS, "pid": pid, "tid": 0,
            "args": {"layer": layer, "mb": mb, "step": 0}}


def _step(pid: int, step: int, lo_ms: float, hi_ms: float) -> dict:
    return {"ph": "X", "name": f"step {step}", "cat": "step", "ts": lo_ms * MS, "dur": (hi_ms - lo_ms) * MS, "pid": pid,
            "tid": 1, "args": {"step": step, "tokens": 3, "microbatches": 1}}


def make_trace() -> dict:
    """attention.0 (pid 0) and expert.0 (pid 1); steps 0: [0, 10] ms, 1: [10, 28] ms, 2: [30, 50] ms.

    Default window = steps 1 and 2 = [10, 28] ∪ [30, 50] = 38 ms (the [28, 30] gap is outside).
      attention compute inside: [6,12]→2 (straddles the start) + [12,15]→3 + [23,28]→5 + [30,40]→10 = 20 ms
      expert compute inside:    [5,11]→1 (straddles)            + [16,22]→6 + [33,37]→4 + [45,52]→5 (straddles end) = 16 ms
    """
    ev = _meta(0, "attention.0") + _meta(1, "expert.0")
    ev += [_step(0, 0, 0, 10), _step(0, 1, 10, 28), _step(0, 2, 30, 50)]
    ev += [
        _seg(0, "compute", 0, 6, layer=0, mb=0),
        _seg(0, "compute", 6, 12, layer=1, mb=0),
        _seg(0, "compute", 12, 15, layer=0, mb=0),
        _seg(0, "send", 15, 16),
        _seg(0, "wait", 16, 22),
        _seg(0, "recv", 22, 23),
        _seg(0, "compute", 23, 28, layer=1, mb=0),  # then idle gap [28, 30]
        _seg(0, "compute", 30, 40, layer=0, mb=0),
        _seg(0, "wait", 40, 50),
    ]
    ev += [
        _seg(1, "compute", 5, 11, layer=1, mb=0),  # then idle gap [11, 12]
        _seg(1, "recv", 12, 16),
        _seg(1, "compute", 16, 22, layer=0, mb=0),
        _seg(1, "send", 22, 23),
        _seg(1, "compute", 33, 37, layer=0, mb=0),
        _seg(1, "compute", 45, 52, layer=1, mb=0),
    ]
    return {"traceEvents": ev, "displayTimeUnit": "ms", "metadata": {"microbatches": 1}}


def test_summarize_default_window_is_decode_steps_with_clipping_and_gaps():
    s = summarize(make_trace())
    assert s["steps"] == [1, 2]  # step 0 (prefill) excluded by default
    assert s["window_s"] == pytest.approx(0.038)
    assert s["step_s"] == pytest.approx([0.018, 0.020])
    att, exp = s["roles"]["attention.0"], s["roles"]["expert.0"]
    assert att["busy_s"] == pytest.approx(0.020)
    assert att["idle_fraction"] == pytest.approx(1 - 20 / 38)
    assert (att["send_s"], att["recv_s"], att["wait_s"]) == pytest.approx((0.001, 0.001, 0.016))
    assert exp["busy_s"] == pytest.approx(0.016)
    assert exp["idle_fraction"] == pytest.approx(1 - 16 / 38)
    assert (exp["send_s"], exp["recv_s"], exp["wait_s"]) == pytest.approx((0.001, 0.004, 0.0))
    assert s["sides"] == pytest.approx({"attention": 1 - 20 / 38, "expert": 1 - 16 / 38})


def test_summarize_with_wall_clock_timestamps():
    """The runtime's ts are epoch microseconds (~1.7e15): the numbers must not change."""
    t = make_trace()
    for e in t["traceEvents"]:
        if e["ph"] == "X":
            e["ts"] += 1.7e15
    s, ref = summarize(t), summarize(make_trace())
    assert s["window_s"] == pytest.approx(ref["window_s"], abs=1e-6)
    assert s["step_s"] == pytest.approx(ref["step_s"], abs=1e-6)
    for name in ref["roles"]:
        assert s["roles"][name]["idle_fraction"] == pytest.approx(ref["roles"][name]["idle_fraction"], abs=1e-4)


def test_summarize_chosen_steps():
    s = summarize(make_trace(), steps=[2])
    assert s["window_s"] == pytest.approx(0.020) and s["step_s"] == pytest.approx([0.020])
    assert s["roles"]["attention.0"]["idle_fraction"] == pytest.approx(0.5)  # [30,40] of [30,50]
    assert s["roles"]["expert.0"]["idle_fraction"] == pytest.approx(1 - 9 / 20)  # 4 + 5 (clipped from 7)
    s0 = summarize(make_trace(), steps=[0])
    assert s0["roles"]["attention.0"]["busy_s"] == pytest.approx(0.010)  # [0,6] + [6,10] of the straddler
    with pytest.raises(MscError, match="step.*7.*not in the trace"):
        summarize(make_trace(), steps=[7])


def test_summarize_falls_back_to_all_steps_without_decode():
    t = make_trace()
    t["traceEvents"] = [e for e in t["traceEvents"] if not (e.get("tid") == 1 and e["args"]["step"] >= 1)]
    s = summarize(t)
    assert s["steps"] == [0] and s["window_s"] == pytest.approx(0.010)


def test_summarize_several_attention_roles_take_max_duration_and_widest_window():
    ev = _meta(0, "attention.0") + _meta(1, "attention.1") + _meta(2, "expert.0")
    ev += [_step(0, 1, 10, 28), _step(1, 1, 11, 31)]  # durations 18 and 20 ms; window [10, 31]
    ev += [_seg(0, "compute", 10, 20), _seg(1, "compute", 11, 13), _seg(2, "compute", 0, 100)]
    s = summarize({"traceEvents": ev})
    assert s["step_s"] == pytest.approx([0.020])
    assert s["window_s"] == pytest.approx(0.021)
    assert list(s["roles"]) == ["attention.0", "attention.1", "expert.0"]
    assert s["roles"]["expert.0"]["idle_fraction"] == pytest.approx(0.0)
    assert s["sides"]["attention"] == pytest.approx(((1 - 10 / 21) + (1 - 2 / 21)) / 2)


def test_ideal_step_time_ping_pong_formula():
    assert ideal_step_time(10.0, 10.0, 0.0, 3, 2) == pytest.approx(70.0)  # 20 + 10 * (6 - 1)
    # unbalanced: T_f = max(10, 4) = 10 → (10 + 4 + 2*1) + 10 * (2*3 - 1) = 16 + 50
    assert ideal_step_time(10.0, 4.0, 1.0, 2, 3) == pytest.approx(66.0)
    assert ideal_step_time(4.0, 10.0, 1.0, 2, 3) == pytest.approx(66.0)
    assert ideal_step_time(5.0, 3.0, 2.0, 1, 1) == pytest.approx(12.0)  # no pipelining: a + e + 2c
    with pytest.raises(MscError):
        ideal_step_time(1.0, 1.0, 0.0, 0, 2)


def _color_mask(img: np.ndarray, color: str, tol: float = 0.02) -> np.ndarray:
    return np.all(np.abs(img[..., :3] - np.array(mcolors.to_rgb(color))) < tol, axis=-1)


def _runs(rows: np.ndarray) -> int:
    """Number of contiguous runs in a sorted array of row indices."""
    return 0 if rows.size == 0 else 1 + int(np.count_nonzero(np.diff(rows) > 1))


def test_plot_trace_writes_png_with_both_lanes(tmp_path):
    out = tmp_path / "trace.png"
    plot_trace(make_trace(), str(out), title="synthetic")
    assert out.stat().st_size > 0
    assert [p.name for p in tmp_path.iterdir()] == ["trace.png"]  # no temp file left behind
    img = mimage.imread(str(out))
    h, w = img.shape[:2]
    fw, fh = trace_plot.figure_size(2)
    assert (w, h) == (round(fw * trace_plot.DPI), round(fh * trace_plot.DPI))
    plot_area = img[:, : int(w * 0.8)]  # the legend sits at the right edge
    colours = [c for c in trace_plot.CATEGORY_COLORS.values() if _color_mask(plot_area, c).sum() > 50]
    assert len(colours) >= 2
    rows = np.nonzero(_color_mask(plot_area, trace_plot.CATEGORY_COLORS["compute"]).any(axis=1))[0]
    assert _runs(rows) == 2  # compute bars in the attention lane and, separately, in the expert lane


def test_plot_trace_into_missing_directory(tmp_path):
    with pytest.raises(MscError, match="nope.*does not exist"):
        plot_trace(make_trace(), str(tmp_path / "nope" / "trace.png"))
    assert list(tmp_path.iterdir()) == []


def test_plot_trace_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    out = tmp_path / "trace.png"
    out.write_bytes(b"old")

    def broken_savefig(self, fname, **kw):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(MscError, match="cannot write plot.*No space left"):
        plot_trace(make_trace(), str(out))
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["trace.png"]


def test_load_trace_round_trip_and_errors(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(make_trace()))
    assert load_trace(good) == make_trace()

    missing = tmp_path / "missing.json"
    with pytest.raises(MscError, match=r"missing\.json does not exist.*traceEvents"):
        load_trace(missing)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(MscError, match=r"bad\.json is not valid JSON"):
        load_trace(bad)
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"events": []}))
    with pytest.raises(MscError, match=r"empty\.json has no traceEvents list"):
        load_trace(empty)
    nodur = tmp_path / "nodur.json"
    nodur.write_text(json.dumps({"traceEvents": [{"ph": "X", "ts": 1.0, "pid": 0, "tid": 0}]}))
    with pytest.raises(MscError, match=r"traceEvents\[0\].*'dur'"):
        load_trace(nodur)
