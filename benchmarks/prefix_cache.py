"""Automatic prefix caching on a shared system prompt: the engine with prefix caching on against off, side by side
in one run (msc/runtime/prefix_cache.py).

    python benchmarks/prefix_cache.py --out prefix_cache.json                      # the tiny Mixtral, CPU
    python benchmarks/prefix_cache.py --model mixtral --layers 16 --device cuda    # Mixtral-8x7B shape, bf16, random weights

Workload: R requests, each the same --system tokens followed by --unique tokens of its own, --new tokens generated
each; request i arrives at engine step i (a stream of requests, as a server sees them), or with --burst the first
at step 0 and all others together at step 1 (one step then continues many cached prefixes). Both engines run the same
program; the order alternates over --reps repetitions, and each figure is the median over them. Reported: wall time
of the whole workload, prompt tokens computed (from the engines' step records), the seconds of steps that fed
prompt tokens, and whether the greedy tokens of the variants are equal. --per-chunk adds caching on with the chunks
that continue a cached prefix attended one call per chunk, as the engine did before they were batched. Writes JSON (machine, versions, rows).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_step import _bundle  # noqa: E402


LABELS = {"on": "on", "off": "off", "on_per_chunk": "on, one call per chunk"}


@contextmanager
def _one_call_per_chunk(on: bool):
    """With on: paged_kv attends every chunk that continues a cached prefix apart (no batches), the path the
    engine took before continuing chunks were batched; a comparison only, the engine itself always batches."""
    import msc.runtime.paged_kv as pk

    real = pk._chunk_batches
    if on:
        pk._chunk_batches = lambda cache, spans, *a: ([], list(spans))
    try:
        yield
    finally:
        pk._chunk_batches = real


def run(eng, prompts: list[list[int]], new: int, burst: bool = False) -> dict:
    from msc.engine.request import SamplingParams

    first = eng.step_no
    sync = torch.cuda.synchronize if eng.runner.device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    arrivals = [min(i, 1) for i in range(len(prompts))] if burst else list(range(len(prompts)))
    reqs = eng.generate(prompts, SamplingParams(max_tokens=new, ignore_eos=True), arrivals=arrivals)
    sync()
    wall = time.perf_counter() - t
    recs = [r for r in eng.records if r.step >= first]
    return {"wall_s": wall, "prompt_tokens_computed": sum(n for r in recs for _, n in r.prefill),
            "prompt_tokens_cached": sum(n for r in recs for _, n in r.cached),
            "prefill_step_s": sum(r.seconds for r in recs if r.prefill), "outputs": [r.output for r in reqs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", choices=["tiny", "mixtral"])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--system", type=int, default=512, help="shared prompt tokens")
    ap.add_argument("--unique", type=int, default=16, help="each request's own prompt tokens")
    ap.add_argument("--new", type=int, default=8, help="tokens generated per request")
    ap.add_argument("--burst", action="store_true", help="all requests but the first arrive together")
    ap.add_argument("--per-chunk", action="store_true", help="also caching on with the chunks that continue a cached "
                    "prefix attended one call per chunk (as before they were batched), side by side")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="prefix_cache.json")
    args = ap.parse_args()
    from msc.bench import machine_info
    from msc.engine.build import build_engine

    vocab = 32000 if args.model == "mixtral" else 256
    g = torch.Generator().manual_seed(0)
    system = torch.randint(3, vocab, (args.system,), generator=g).tolist()
    prompts = [system + torch.randint(3, vocab, (args.unique,), generator=g).tolist() for _ in range(args.requests)]
    seq = args.system + args.unique + args.new + 16
    with tempfile.TemporaryDirectory() as tmp:
        bundle = _bundle(tmp, args.model, args.layers, args.requests, seq)
        gm = bundle.load_program(bundle.manifest["colocated"]["program"], args.device, random_weights=True)
        engines = {on: build_engine(bundle.manifest, gm, args.device, prefix_caching=on) for on in (True, False)}
        for eng in engines.values():  # warm-up: kernels compile, graphs are captured (other tokens than the workload's)
            run(eng, [[5 + i] * (args.unique + 1) for i in range(2)], 2)
        # variant -> (engine, chunks that continue a cached prefix attended one call per chunk, as before batching)
        variants = {"on": (engines[True], False), "off": (engines[False], False)}
        if args.per_chunk:
            variants["on_per_chunk"] = (engines[True], True)
        runs: dict[str, list[dict]] = {name: [] for name in variants}
        for rep in range(args.reps):
            names = list(variants) if rep % 2 == 0 else list(reversed(variants))
            for name in names:
                eng, per_chunk = variants[name]
                eng.scheduler.cache.reset_prefix_cache()  # each repetition starts cold: the system prompt computed once
                with _one_call_per_chunk(per_chunk):
                    runs[name].append(run(eng, prompts, args.new, args.burst))
    keys = ("wall_s", "prompt_tokens_computed", "prompt_tokens_cached", "prefill_step_s")
    med = {name: {k: statistics.median(r[k] for r in rs) for k in keys} for name, rs in runs.items()}
    equal = all(r["outputs"] == ref["outputs"] for rs in runs.values() for r, ref in zip(rs, runs["off"]))
    print(f"{args.requests} requests of {args.system} shared + {args.unique} own prompt tokens, {args.new} new each "
          f"({args.model}, {args.layers} layers, {args.device}{', burst' if args.burst else ''}; medians of {args.reps})")
    print("| prefix caching | wall s | prompt tokens computed | cached | prefill steps s |")
    print("|---|---|---|---|---|")
    for name, m in med.items():
        print(f"| {LABELS[name]} | {m['wall_s']:.3f} | {m['prompt_tokens_computed']:.0f} | "
              f"{m['prompt_tokens_cached']:.0f} | {m['prefill_step_s']:.3f} |")
    ratio = med["off"]["wall_s"] / med["on"]["wall_s"]
    print(f"off / on wall: {ratio:.2f}x; prefill steps {med['off']['prefill_step_s'] / med['on']['prefill_step_s']:.2f}x;"
          f" greedy tokens equal: {equal}")
    if args.per_chunk:
        print(f"prefill steps, one call per chunk / batched: "
              f"{med['on_per_chunk']['prefill_step_s'] / med['on']['prefill_step_s']:.2f}x")
    res = {"meta": {**machine_info(), "model": args.model, "layers": args.layers, "device": args.device,
                    "requests": args.requests, "system": args.system, "unique": args.unique, "new": args.new,
                    "reps": args.reps, "burst": args.burst, "per_chunk": args.per_chunk},
           "median": med, "off_over_on_wall": ratio, "tokens_equal": equal,
           "runs": {name: [{k: v for k, v in r.items() if k != "outputs"} for r in rs] for name, rs in runs.items()}}
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
