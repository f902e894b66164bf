"""The runtime timeline: what each role process did when, written as a Chrome / Perfetto trace.

Every role records spans of four kinds on its work lane (tid 0): `compute` (the model, and injected
delays, marked `injected`), `send`, `recv` and `wait` (blocked on peers), each tagged with the layer,
micro-batch and step. Attention roles also record one `step` span per forward on lane 1.

NOTE: spans nest in the code (a stage's compute contains the combine's wait), but the trace stores flat,
exclusive segments: when an inner span opens, the outer one's current segment closes, and it reopens
when the inner one ends. A lane then never overlaps itself, so busy and idle time are plain sums and
the picture has one colour per instant.

Times are `time.time_ns()` (wall clock) so that the lanes of processes on one host, or on hosts with
synchronised clocks, line up in one picture.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Iterator

CATEGORIES = ("compute", "send", "recv", "wait")


class Trace:
    """Records the spans of one role process; `enabled=False` makes every call a cheap no-op."""

    def __init__(self, role: str, rank: int, enabled: bool = True):
        self.role, self.rank, self.enabled = role, rank, enabled
        self.events: list[dict] = []
        self._stack: list[list] = []  # open spans: [cat, name, args, segment_start_ns]
        self.step = 0

    @contextlib.contextmanager
    def span(self, cat: str, name: str, layer: int | None = None, mb: int | None = None, **extra) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        now = time.time_ns()
        if self._stack:
            self._close_segment(self._stack[-1], now)
        args = {"layer": layer, "mb": mb, "step": self.step, **extra}
        frame = [cat, name, args, now]
        self._stack.append(frame)
        try:
            yield
        finally:
            end = time.time_ns()
            self._stack.pop()
            self._close_segment(frame, end)
            if self._stack:
                self._stack[-1][3] = end  # the outer span resumes

    def _close_segment(self, frame: list, end_ns: int) -> None:
        cat, name, args, start = frame
        if end_ns > start:
            self.events.append({"ph": "X", "name": name, "cat": cat, "ts": start / 1e3, "dur": (end_ns - start) / 1e3,
                                "pid": self.rank, "tid": 0, "args": dict(args)})

    def mark_step(self, start_ns: int, end_ns: int, tokens: int, microbatches: int) -> None:
        """One forward of an attention role (lane 1)."""
        if self.enabled:
            self.events.append({"ph": "X", "name": f"step {self.step}", "cat": "step", "ts": start_ns / 1e3,
                                "dur": (end_ns - start_ns) / 1e3, "pid": self.rank, "tid": 1,
                                "args": {"step": self.step, "tokens": tokens, "microbatches": microbatches}})

    def metadata_events(self) -> list[dict]:
        return [
            {"ph": "M", "name": "process_name", "pid": self.rank, "tid": 0, "args": {"name": self.role}},
            {"ph": "M", "name": "process_sort_index", "pid": self.rank, "tid": 0, "args": {"sort_index": self.rank}},
            {"ph": "M", "name": "thread_name", "pid": self.rank, "tid": 0, "args": {"name": "work"}},
            {"ph": "M", "name": "thread_name", "pid": self.rank, "tid": 1, "args": {"name": "steps"}},
        ]

    def write(self, path: str | Path) -> None:
        """This role's events as a JSON list (the launcher merges the roles' lists into one trace)."""
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.metadata_events() + self.events))
        os.replace(tmp, path)


def merge_traces(parts: list[Path], out: str | Path, metadata: dict) -> int:
    """Write one Chrome trace from the roles' event lists; returns the number of events."""
    events: list[dict] = []
    for p in parts:
        events += json.loads(Path(p).read_text())
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms", "metadata": metadata}))
    os.replace(tmp, out)
    return len(events)
