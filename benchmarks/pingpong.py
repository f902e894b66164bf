"""Ping-pong pipeline benchmark: decode step time and idle fraction per side for m = 1..4 micro-batches.

    python benchmarks/pingpong.py --out docs/results/pingpong_cpu.json [--delays 20,50] [--m 1,2,3,4]
                                  [--plots docs] [--bundle DIR] [--tokens 6]

The embedded tiny Mixtral (2 layers, 1 attention replica, 2 expert nodes) runs as 3 processes with an
injected compute delay d per layer on both sides (spec runtime.delay_ms; each of a step's m
micro-batches waits d/m, as compute splits with the batch). On a CPU box the model's own compute is
tiny, so the delays stand in for GPU compute and the numbers show how well the pipeline overlaps the
two sides. For every (d, m): the median decode step time, the ping-pong formula's ideal
(T_a = T_e = d/m, T_c = 0: (T_a + T_e + 2·T_c) + T_f·(m·L − 1)), their ratio, and each side's idle
fraction over the decode steps (from the run's trace). The formula is also evaluated with the times
each side really spent per micro-batch and layer (T_a, T_e from the trace: delay plus the model's own
compute), which shows how much of the gap to the ideal is the schedule and how much is compute. Prints a table and writes JSON with the machine
and versions; with --plots, also draws the timelines of m = 1 and m = 3 at the largest delay.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = [[5, 17, 42, 100, 3], [7, 7], [1, 2, 3, 4, 5, 6, 200, 9], [9, 9, 9], [4], [11, 12, 13], [30, 31], [250, 3, 3, 3]]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="pingpong.json")
    ap.add_argument("--delays", default="20,50", help="injected delay d per layer in ms, comma-separated")
    ap.add_argument("--m", default="1,2,3,4", help="micro-batch counts")
    ap.add_argument("--tokens", type=int, default=6, help="new tokens per prompt (decode steps + 1)")
    ap.add_argument("--bundle", help="a compiled bundle to use (default: compile the embedded tiny Mixtral)")
    ap.add_argument("--plots", help="directory for timeline_m1.png and timeline_m3.png (largest delay)")
    a = ap.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from msc.bench import machine_info
    from msc.compiler import compile_spec
    from msc.runtime.launcher import run_bundle
    from msc.spec import default_spec
    from msc.trace_plot import ideal_step_time, load_trace, plot_trace, summarize

    delays, ms = [float(d) for d in a.delays.split(",")], _ints(a.m)
    console = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="msc-pingpong-") as tmp:
        bundle_dir = a.bundle or compile_spec(default_spec(), Path(tmp) / "bundle").path
        layers = json.loads((Path(bundle_dir) / "manifest.json").read_text())["model"]["num_hidden_layers"]
        rows = []
        for d in delays:
            for m in ms:
                trace_path = Path(tmp) / f"trace_d{d:g}_m{m}.json"
                console.print(f"d = {d:g} ms, m = {m} ...")
                t0 = time.perf_counter()
                res = run_bundle(bundle_dir, PROMPTS, a.tokens, microbatches=m, delay_ms={"attention": d, "expert": d},
                                 trace=trace_path)
                wall = time.perf_counter() - t0
                decode = res["step_times"][0][1:]
                trace = load_trace(trace_path)
                summary = summarize(trace)
                ideal = ideal_step_time(d / m / 1e3, d / m / 1e3, 0.0, m, layers)
                step = statistics.median(decode)
                # The same formula with the per-micro-batch times this run really had (injected delay plus the
                # model's own compute, from the trace): how close the schedule gets to what its times allow.
                n = len(summary["step_s"])
                busy = {side: max(r["busy_s"] for r in summary["roles"].values() if r["side"] == side) / n / (m * layers)
                        for side in ("attention", "expert")}
                predicted = ideal_step_time(busy["attention"], busy["expert"], 0.0, m, layers)
                rows.append({
                    "delay_ms": d, "microbatches": m, "decode_steps": len(decode),
                    "step_ms_median": step * 1e3, "step_ms_all": [s * 1e3 for s in decode],
                    "ideal_ms": ideal * 1e3, "ratio_to_ideal": step / ideal,
                    "t_a_ms": busy["attention"] * 1e3, "t_e_ms": busy["expert"] * 1e3,
                    "predicted_from_measured_ms": predicted * 1e3, "ratio_to_predicted": step / predicted,
                    "idle_attention": summary["sides"]["attention"], "idle_expert": summary["sides"]["expert"],
                    "run_wall_s": wall,
                })
                if a.plots and m in (1, 3) and d == max(delays):
                    Path(a.plots).mkdir(parents=True, exist_ok=True)
                    plot_trace(trace, Path(a.plots) / f"timeline_m{m}.png",
                               title=f"tiny Mixtral, d = {d:g} ms per layer on each side, m = {m}: decode steps")
        base = {r["delay_ms"]: r["step_ms_median"] for r in rows if r["microbatches"] == 1}
        for r in rows:
            r["speedup_vs_m1"] = base[r["delay_ms"]] / r["step_ms_median"] if r["delay_ms"] in base else None

    table = Table(title=f"ping-pong pipeline, tiny Mixtral (L = {layers}), 1 attention + 2 expert processes")
    for col in ("d ms", "m", "decode step ms (median)", "ideal ms", "step / ideal", "T_a / T_e ms", "formula(T_a, T_e)",
                "step / formula", "vs m=1", "idle attention", "idle experts"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(f"{r['delay_ms']:g}", str(r["microbatches"]), f"{r['step_ms_median']:.1f}", f"{r['ideal_ms']:.1f}",
                      f"{r['ratio_to_ideal']:.2f}", f"{r['t_a_ms']:.1f} / {r['t_e_ms']:.1f}",
                      f"{r['predicted_from_measured_ms']:.1f}", f"{r['ratio_to_predicted']:.2f}",
                      f"{r['speedup_vs_m1']:.2f}×" if r["speedup_vs_m1"] else "-",
                      f"{r['idle_attention']:.0%}", f"{r['idle_expert']:.0%}")
    Console(width=140).print(table)
    result = {
        "benchmark": "pingpong", "model": "tiny Mixtral (embedded default)", "layers": layers, "prompts": len(PROMPTS),
        "new_tokens": a.tokens, "delays_ms": delays, "microbatches": ms,
        "machine": machine_info(),
        "rows": rows,
    }
    out = Path(a.out)
    tmp_out = out.with_name(f".{out.name}.tmp")
    tmp_out.write_text(json.dumps(result, indent=1))
    os.replace(tmp_out, out)
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
