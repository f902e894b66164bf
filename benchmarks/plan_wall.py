"""Wall time of `msc plan`, cold and cached, next to the time of importing what it cannot do without.

A cold `msc plan` (no cost-model cache: MSC_NO_CACHE=1) imports torch and the model's transformers module,
builds the model on the meta device, captures one layer per kind with torch.export, derives the cost model
and searches. On a 2-core machine the imports alone take most of it, so this script also times the import
floor, `python -c "import os, torch, transformers.models.X.modeling_X; os._exit(0)"`, side by side (same rounds, rotated
order), and reports what `msc plan` spends above it. A cached run reads the cost model from MSC_CACHE_DIR.

    python benchmarks/plan_wall.py [--specs a.yaml,b.yaml] [--rounds 5] [--budget-s 5] [-o plan_wall.json]

Prints a table (medians; min-max of the cold runs; how many cold runs met the budget) and writes JSON with
every sample, the machine and the versions.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SPECS = [ROOT / "examples" / f"plan-{n}.yaml"
                 for n in ("mixtral-8x22b-a100", "dbrx-a100", "mixtral-8x22b-h20-l40s", "dbrx-h20-l40s")]
# NOTE: the same entry point as the `msc` console script, run by this interpreter so the venv is the same
MSC = [sys.executable, "-c", "import sys; from msc.cli import main; sys.exit(main())"]
# NOTE: the floor ends with os._exit like `msc plan` does (msc.cli skips the interpreter's teardown, which
# spends ~1 s collecting torch's and transformers' objects on this VM); a plain exit would overstate it
FLOOR = "import os, torch, transformers.models.{mt}.modeling_{mt}; os._exit(0)"


def model_type(spec_path: Path) -> str:
    from msc.spec import load_spec

    spec = load_spec(spec_path)
    if spec.model.config is None:
        raise SystemExit(f"{spec_path}: plan_wall needs a spec with an inline model config (model.config)")
    return spec.model.config["model_type"]


def timed(cmd: list[str], env: dict, timeout_s: float = 300.0) -> tuple[float, str]:
    """Wall seconds from starting `cmd` to its exit, and its stdout; a failure stops the benchmark."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[3:]) or cmd} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return wall, proc.stdout


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--specs", default=",".join(str(p) for p in DEFAULT_SPECS), help="comma-separated plan specs")
    ap.add_argument("--rounds", type=int, default=5, help="cold, cached and floor runs per spec")
    ap.add_argument("--budget-s", type=float, default=5.0, help="the cold wall-time target to count runs against")
    ap.add_argument("-o", "--out", default="plan_wall.json")
    a = ap.parse_args(argv)
    if a.rounds < 1:
        ap.error("--rounds must be at least 1")

    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from msc.bench import machine_info

    specs = [Path(s) for s in a.specs.split(",") if s]
    for s in specs:
        if not s.is_file():
            ap.error(f"no spec file {s}")
    kinds = {s: model_type(s) for s in specs}
    samples = {s: {"cold": [], "cached": [], "floor": []} for s in specs}
    base_env = {k: v for k, v in os.environ.items() if k not in ("MSC_NO_CACHE", "MSC_CACHE_DIR")}
    with tempfile.TemporaryDirectory(prefix="msc-plan-wall-") as cache:
        cold_env = {**base_env, "MSC_NO_CACHE": "1"}
        cached_env = {**base_env, "MSC_CACHE_DIR": cache}

        def run(kind: str, spec: Path) -> float:
            if kind == "floor":
                mt = kinds[spec].replace("-", "_")
                return timed([sys.executable, "-c", FLOOR.format(mt=mt)], base_env)[0]
            wall, out = timed([*MSC, "plan", str(spec), "--top", "5"], cold_env if kind == "cold" else cached_env)
            if "colocated baseline" not in out:
                raise SystemExit(f"msc plan {spec} printed no plan table:\n{out[-2000:]}")
            return wall

        order = ["floor", "cold", "cached"]
        with Progress(console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("msc plan wall time", total=len(specs) * (a.rounds * 3 + 1))
            for s in specs:  # fill the cache (and warm the page cache) before timing anything
                run("cached", s)
                bar.advance(task)
            for r in range(a.rounds):
                for i, s in enumerate(specs):
                    # NOTE: the kinds rotate from run to run, so a drift of the machine's speed over the rounds
                    # (this 2-core VM's does) is shared by floor, cold and cached instead of landing on one
                    for kind in order[(r + i) % 3:] + order[:(r + i) % 3]:
                        samples[s][kind].append(run(kind, s))
                        bar.advance(task)

    rows = []
    for s in specs:
        d = samples[s]
        cold, floor = statistics.median(d["cold"]), statistics.median(d["floor"])
        rows.append({"spec": s.name, "model_type": kinds[s], "cold_p50_s": cold, "cold_min_s": min(d["cold"]),
                     "cold_max_s": max(d["cold"]), "floor_p50_s": floor, "above_floor_s": cold - floor,
                     "cached_p50_s": statistics.median(d["cached"]),
                     "cold_within_budget": sum(v < a.budget_s for v in d["cold"]), "runs": len(d["cold"]),
                     "samples": d})
    table = Table(title=f"msc plan wall time, {a.rounds} rounds (seconds; cold = MSC_NO_CACHE=1)")
    for col in ("spec", "import floor", "cold p50", "cold min-max", "cold - floor", "cached p50", f"cold < {a.budget_s:g} s"):
        table.add_column(col, justify="left" if col == "spec" else "right")
    for r in rows:
        table.add_row(r["spec"], f"{r['floor_p50_s']:.2f}", f"{r['cold_p50_s']:.2f}",
                      f"{r['cold_min_s']:.2f}-{r['cold_max_s']:.2f}", f"{r['above_floor_s']:+.2f}",
                      f"{r['cached_p50_s']:.2f}", f"{r['cold_within_budget']}/{r['runs']}")
    Console(width=140).print(table)
    result = {"benchmark": "plan_wall", "budget_s": a.budget_s, "rounds": a.rounds,
              "floor_command": f"python -c '{FLOOR}'",
              "machine": machine_info(("msc", "torch", "transformers")), "rows": rows}
    out = Path(a.out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)
    return result


if __name__ == "__main__":
    main()
