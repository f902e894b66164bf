"""Serving under load: closed-loop clients against `ServingEngine`, next to `msc run` on the same prompts.

Each of --concurrency clients submits a request, waits for its answer and submits the next, until
--requests have been answered; the engine batches what is waiting into rounds. For reference the same
requests are also submitted all at once (the static best case), and `msc run` (run_bundle) generates the
same prompts: serving must give its tokens. Prints a table
(requests/s, generated tokens/s, latency p50/p99, waves) and writes JSON with the machine and versions.

    python benchmarks/serve_load.py                                   # the embedded tiny Mixtral, CPU
    python benchmarks/serve_load.py --model mixtral --layers 16 --device cuda --batch 64 \\
        --requests 256 --concurrency 64 --input-len 571 --output-len 32 --out serve_load.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _spec(args):
    from msc.spec import default_spec, parse_spec

    plan = {"attention": {"replicas": args.replicas}, "experts": {"nodes": args.expert_nodes}, "batch_size": args.batch,
            "microbatches": args.microbatches}
    if args.model == "tiny":
        d = default_spec().model_dump(mode="json", exclude_none=True)
        d["plan"] = plan
        if args.device:
            d["device"] = args.device
        return parse_spec(d), False
    from e2e_decode import MIXTRAL_8X7B

    cfg = {"model_type": "mixtral", **MIXTRAL_8X7B, "num_hidden_layers": args.layers}
    return parse_spec({"model": {"config": cfg, "dtype": "bfloat16"}, "device": "meta", "plan": plan,
                       "runtime": {"timeout_s": 600}}), True


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["tiny", "mixtral"], default="tiny", help="tiny: the embedded default; "
                    "mixtral: Mixtral-8x7B's shape with --layers layers, bf16, random weights")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--expert-nodes", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="the plan's batch_size (sequences per replica and wave)")
    ap.add_argument("--microbatches", type=int, default=1)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--input-len", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=8)
    ap.add_argument("--out", default="serve_load.json")
    args = ap.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table

    from msc.bench import machine_info
    from msc.compiler import compile_spec
    from msc.runtime.launcher import run_bundle
    from msc.runtime.serving import ServingEngine

    spec, random_weights = _spec(args)
    device = args.device or ("cuda" if random_weights else None)
    vocab = spec.model.config["vocab_size"] if spec.model.config else 256
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, vocab, (args.requests, args.input_len), generator=g).tolist()
    rows = []
    with tempfile.TemporaryDirectory(prefix="msc-serve-load-") as tmp:
        bundle = compile_spec(spec, Path(tmp) / "b")
        ref = run_bundle(bundle.path, prompts, args.output_len, random_weights=random_weights, device=device)
        engine = ServingEngine(bundle.path, random_weights=random_weights, device=device)
        t0 = time.perf_counter()
        engine.start()
        startup = time.perf_counter() - t0
        engine.generate(prompts[: min(len(prompts), args.concurrency)], 2)  # warm-up: kernels compiled, caches made
        # all requests at once: the static best case (every prompt known up front)
        waves0 = engine.health()["waves"]
        t0 = time.perf_counter()
        burst = [f.result(timeout=engine.wave_timeout_s * 4) for f in [engine.submit(p, args.output_len) for p in prompts]]
        wall = time.perf_counter() - t0
        lat = [c.seconds for c in burst]
        rows.append({"mode": "msc serve, all requests at once", "seconds": wall, "requests_per_s": len(prompts) / wall,
                     "tokens_per_s": sum(len(c.token_ids) for c in burst) / wall, "latency_p50_s": statistics.median(lat),
                     "latency_p99_s": _pct(lat, 0.99), "waves": engine.health()["waves"] - waves0,
                     "same_tokens_as_run": sum(c.token_ids == o for c, o in zip(burst, ref["outputs"]))})
        waves0 = engine.health()["waves"]
        latencies: list[float] = []
        outputs: dict[int, list[int]] = {}
        next_index = iter(range(len(prompts)))
        lock = threading.Lock()

        def client() -> None:
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                done = engine.submit(prompts[i], args.output_len).result(timeout=engine.wave_timeout_s * 4)
                latencies.append(done.seconds)
                outputs[i] = done.token_ids

        clients = [threading.Thread(target=client) for _ in range(args.concurrency)]
        t0 = time.perf_counter()
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        wall = time.perf_counter() - t0
        waves = engine.health()["waves"] - waves0
        engine.close()
        gen = sum(len(o) for o in outputs.values())
        same = sum(outputs[i] == ref["outputs"][i] for i in range(len(prompts)))
        rows.append({"mode": f"msc serve, {args.concurrency} closed-loop clients", "seconds": wall,
                     "requests_per_s": len(prompts) / wall, "tokens_per_s": gen / wall,
                     "latency_p50_s": statistics.median(latencies), "latency_p99_s": _pct(latencies, 0.99),
                     "waves": waves, "startup_s": startup, "same_tokens_as_run": same})

    table = Table(title=f"serving {args.model} ({args.layers if args.model != 'tiny' else 2} layers) on {device or 'cpu'}: "
                        f"{args.requests} requests, {args.input_len} in / {args.output_len} out, batch {args.batch}, "
                        f"{args.replicas} replica(s) × {args.expert_nodes} expert nodes")
    for col in ("mode", "s", "req/s", "gen tok/s", "p50 s", "p99 s", "waves"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for r in rows:
        table.add_row(r["mode"], f"{r['seconds']:.2f}", f"{r['requests_per_s']:.2f}", f"{r['tokens_per_s']:.1f}",
                      f"{r.get('latency_p50_s', float('nan')):.3f}", f"{r.get('latency_p99_s', float('nan')):.3f}",
                      str(r.get("waves", "-")))
    Console(width=150).print(table)
    print(f"serving gave the same tokens as msc run for {rows[0]['same_tokens_as_run']} (all at once) and "
          f"{rows[1]['same_tokens_as_run']} (clients) of {len(prompts)} requests; roles started in {rows[1]['startup_s']:.1f} s")
    info = machine_info()
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    result = {"benchmark": "serve_load", "args": vars(args), "machine": info, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
