"""Benchmark (GPU): the one engine, colocated and disaggregated, and serving on it, side by side in one run.

Mixtral-8x7B's shape with --layers layers (bf16, random weights made on the GPU, the same numbers in every
deployment), the reference's workload (571 prompt tokens, 159 new ones, EOS ignored):

- colocated: the bundle's colocated program on the engine in this process (CUDA graphs for decode steps):
  the median wall time of a decode step (host scheduling and the per-step sync included), and the
  replay-only time of the same step (`ModelRunner.time_decode`, CUDA events: what the old engine reported);
- roles: the same bundle as two role processes on this GPU (1 attention replica + 1 expert node, cuda_ipc),
  for each micro-batch count m; the median decode step of the attention replica's engine;
- serve: `ServingEngine` on the role processes with C closed-loop clients (each submits a request, waits for
  it, submits the next), --requests-per-client requests each: generated tokens/s, time to first token and
  time per output token (p50, p99), against the roles' pure decode tokens/s at batch C.

    python benchmarks/engine_step.py --layers 16 --batch 64,256 --m 1,2,3 --serve 64,256 --out engine_step.json
    python benchmarks/engine_step.py --parts colocated,roles --batch 64 --m 1 --variants stage,device-mps --output-len 32
    python benchmarks/engine_step.py --model tiny --device cpu --batch 4 --m 1,2 --serve 4 \
        --input-len 16 --output-len 8                                  # a smoke run of the script on a CPU

Every figure comes from this one run; JSON with the GPU and versions.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

MIXTRAL_8X7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                    num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
                    rope_theta=1e6)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            num_local_experts=4, num_experts_per_tok=2)


def _pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")


def _bundle(tmp: str, model: str, layers: int, batch: int, max_seq_len: int, m: int = 1):
    from msc.compiler import compile_spec
    from msc.spec import parse_spec

    cfg = MIXTRAL_8X7B if model == "mixtral" else TINY
    spec = parse_spec({"model": {"config": {"model_type": "mixtral", **cfg, "num_hidden_layers": layers},
                                 "dtype": "bfloat16" if model == "mixtral" else "float32"}, "device": "meta",
                       "plan": {"attention": {"replicas": 1}, "experts": {"nodes": 1}, "microbatches": m,
                                "batch_size": batch},
                       "runtime": {"timeout_s": 600, "max_seq_len": max_seq_len,
                                   "kv_cache_tokens": batch * max_seq_len}})
    return compile_spec(spec, f"{tmp}/b{batch}")


def colocated(bundle, prompts, batches: list[int], output_len: int, device: str) -> list[dict]:
    """Per batch size: decode step wall time on the engine, and the replay-only time (weights loaded once)."""
    from msc.engine.build import build_engine
    from msc.engine.request import SamplingParams

    gm = bundle.load_program(bundle.manifest["colocated"]["program"], device, random_weights=True)
    eng = build_engine(bundle.manifest, gm, device, prefix_caching=False)  # prompts repeat across batches: all computed
    eng.generate(prompts[:2], SamplingParams(max_tokens=3, ignore_eos=True))  # warm-up: kernels, a graph
    out = []
    for b in batches:
        first = eng.step_no
        eng.generate(prompts[:b], SamplingParams(max_tokens=output_len, ignore_eos=True))
        recs = [r for r in eng.records if r.step >= first and r.tokens]
        decode = [r.seconds for r in recs if not r.prefill and len(r.decode) == b]
        replay = eng.runner.time_decode(b, len(prompts[0]) + output_len // 2)
        out.append({"part": "colocated", "batch": b, "step_s": statistics.median(decode), "replay_step_s": replay,
                    "decode_steps": len(decode), "prefill_s": sum(r.seconds for r in recs if r.prefill)})
    del eng, gm
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


# How the two role processes run (env for the roles; whether under CUDA MPS):
#   stage       host exchange (messages per layer), the compute between them replayed from stage CUDA graphs
#   eager       host exchange, no graphs
#   device      device exchange (msc.runtime.device_exchange: each role's whole decode step one CUDA graph, hand-offs
#               by device flags), the roles time-slicing the GPU
#   device-mps  the same under CUDA MPS (both roles 100 % of the SMs; `auto` turns the device exchange on there):
#               the roles' kernels run side by side
# NOTE: one MPS control daemon serves every MPS variant of the run (started at the first, after the variants
# without it, stopped at the end), rather than one per launch.
VARIANTS = {
    "stage": ({"MSC_STAGE_GRAPHS": "on", "MSC_DEVICE_EXCHANGE": "off"}, False),
    "eager": ({"MSC_STAGE_GRAPHS": "off", "MSC_DEVICE_EXCHANGE": "off"}, False),
    "device": ({"MSC_STAGE_GRAPHS": "on", "MSC_DEVICE_EXCHANGE": "on"}, False),
    "device-mps": ({"MSC_STAGE_GRAPHS": "on", "MSC_DEVICE_EXCHANGE": "auto"}, True),
    "stage-mps": ({"MSC_STAGE_GRAPHS": "on", "MSC_DEVICE_EXCHANGE": "off"}, True),
}
_MPS: dict = {}


def _env(variant: str, device: str) -> dict:
    env, mps = VARIANTS[variant]
    if not mps or device != "cuda":
        return env
    if "daemon" not in _MPS:
        from msc.runtime.mps import MpsDaemon

        _MPS["dir"] = tempfile.mkdtemp(prefix="msc-mps-")
        _MPS["daemon"] = MpsDaemon(Path(_MPS["dir"])).start()
    return {**env, **_MPS["daemon"].env(100)}


def stop_mps() -> None:
    """Stop the MPS daemon the MPS variants started (if any)."""
    if "daemon" in _MPS:
        _MPS.pop("daemon").stop()


def roles(bundle, prompts, output_len: int, m: int, device: str, variant: str = "stage") -> dict:
    from msc.runtime.launcher import run_bundle

    res = run_bundle(bundle.path, prompts, output_len, random_weights=True, device=device, microbatches=m,
                     sampling=[{"ignore_eos": True}] * len(prompts), timeout_s=580, env=_env(variant, device))
    # decode-only steps of the whole batch (the engine's step wall time, as the colocated part measures it)
    steps = [r["seconds"] for r in res["records"][0] if not r["prefill"] and len(r["decode"]) == len(prompts)]
    steps = steps or res["decode_times"][0]
    return {"step_s": statistics.median(steps), "decode_steps": len(steps), "outputs": res["outputs"],
            "variant": variant, "captured_segments": res["captured_segments"][0],
            "device_steps": res["device_steps"][0]}


def serve(bundle, prompts, clients: int, per_client: int, output_len: int, m: int, device: str,
          reference: list[list[int]] | None = None, variant: str = "stage") -> dict:
    from msc.engine.request import SamplingParams
    from msc.runtime.serving import ServingEngine

    eng = ServingEngine(bundle.path, random_weights=True, device=device, microbatches=m, request_timeout_s=1200,
                        env=_env(variant, device))
    t0 = time.perf_counter()
    eng.start(timeout_s=300)
    startup = time.perf_counter() - t0
    params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    try:
        eng.submit(prompts[0], params=SamplingParams(max_tokens=4, ignore_eos=True)).result(timeout=300)  # warm-up
        done, lock = [], threading.Lock()  # (prompt index, handle)
        todo = iter(range(clients * per_client))

        def client() -> None:
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                h = eng.submit(prompts[i % len(prompts)], params=params)
                h.result(timeout=1200)
                with lock:
                    done.append((i % len(prompts), h))

        threads = [threading.Thread(target=client) for _ in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        eng.close()
    ttft = [h.token_times[0] - h.submitted for _, h in done]
    tpot = [(h.token_times[-1] - h.token_times[0]) / (len(h.tokens) - 1) for _, h in done if len(h.tokens) > 1]
    gen = sum(len(h.tokens) for _, h in done)
    same = None
    if reference is not None:  # greedy tokens of the same prompts from `msc run` on the same bundle
        checked = [(i, h) for i, h in done if i < len(reference)]
        same = f"{sum(h.tokens == reference[i] for i, h in checked)}/{len(checked)}"
    return {"clients": clients, "requests": len(done), "seconds": wall, "tokens_per_s": gen / wall,
            "same_tokens_as_roles": same,
            "ttft_p50_s": _pct(ttft, 0.5), "ttft_p99_s": _pct(ttft, 0.99), "tpot_p50_s": _pct(tpot, 0.5),
            "tpot_p99_s": _pct(tpot, 0.99), "startup_s": startup}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["mixtral", "tiny"], default="mixtral",
                    help="mixtral: Mixtral-8x7B's shape, bf16; tiny: the 64-wide test model, float32 (smoke runs)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--batch", default="64,256")
    ap.add_argument("--m", default="1,2,3", help="micro-batch counts of the role processes")
    ap.add_argument("--serve", default="64,256", help="closed-loop client counts (serving runs with the best m)")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--input-len", type=int, default=571)
    ap.add_argument("--output-len", type=int, default=159)
    ap.add_argument("--parts", default="colocated,roles,serve")
    ap.add_argument("--variants", default="stage,device,device-mps",
                    help=f"how the role processes run, each with every m: {', '.join(VARIANTS)}")
    ap.add_argument("--out", default="engine_step.json")
    args = ap.parse_args()
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    parts = set(args.parts.split(","))
    batches = ints(args.batch)
    max_seq_len = args.input_len + args.output_len + 32
    most = max(batches + ints(args.serve))
    g = torch.Generator().manual_seed(0)
    vocab = (MIXTRAL_8X7B if args.model == "mixtral" else TINY)["vocab_size"]
    prompts = torch.randint(3, vocab, (most, args.input_len), generator=g).tolist()
    dev = args.device
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "outputs"}), flush=True)

    with tempfile.TemporaryDirectory(prefix="msc-engine-step-") as tmp, contextlib.ExitStack() as stack:
        stack.callback(stop_mps)  # the MPS daemon goes down whatever happens
        bundle = _bundle(tmp, args.model, args.layers, most, max_seq_len)
        if "colocated" in parts:
            for row in colocated(bundle, prompts, batches, args.output_len, dev):
                emit(row)
        for b in batches:
            if "roles" in parts:
                for variant in sorted(args.variants.split(","), key=lambda v: VARIANTS[v][1]):  # MPS ones last
                    for m in ints(args.m):
                        emit({"part": "roles", "batch": b, "m": m,
                              **roles(bundle, prompts[:b], args.output_len, m, dev, variant)})
        if "serve" in parts:
            for c in ints(args.serve):
                runs = {(r["m"], r["variant"]): r for r in rows if r["part"] == "roles" and r["batch"] == c}
                steps = {k: r["step_s"] for k, r in runs.items()}
                best = min(steps, key=steps.get) if steps else (1, "stage")
                m, variant = best
                ref = runs[best]["outputs"] if steps else None
                row = {"part": "serve", "m": m, "variant": variant,
                       **serve(bundle, prompts, c, args.requests_per_client, args.output_len, m, dev, ref, variant)}
                if steps:
                    row["decode_tokens_per_s"] = c / steps[best]
                    row["serve_over_decode"] = row["tokens_per_s"] / row["decode_tokens_per_s"]
                emit(row)

    gpu = torch.cuda.get_device_name() if dev == "cuda" else "none (CPU)"
    print(f"\n{args.model}, {args.layers} layers, {args.input_len} in / {args.output_len} out, GPU {gpu}")
    print("| batch | what | step ms | vs colocated |")
    print("|---|---|---|---|")
    for b in batches:
        col = next((r for r in rows if r["part"] == "colocated" and r["batch"] == b), None)
        if col:
            print(f"| {b} | colocated engine (wall per step) | {col['step_s'] * 1e3:.2f} | 1.00 |")
            print(f"| {b} | colocated graph replay only | {col['replay_step_s'] * 1e3:.2f} | "
                  f"{col['replay_step_s'] / col['step_s']:.2f} |")
        for r in rows:
            if r["part"] == "roles" and r["batch"] == b:
                rel = f"{r['step_s'] / col['step_s']:.2f}" if col else "-"
                print(f"| {b} | two role processes, m = {r['m']}, {r['variant']} | {r['step_s'] * 1e3:.2f} | {rel} |")
    for r in rows:
        if r["part"] == "serve":
            print(f"serve {r['clients']} clients (m = {r['m']}, {r['variant']}): {r['tokens_per_s']:,.0f} tok/s"
                  + (f" = {r['serve_over_decode']:.2f}x the roles' decode" if "serve_over_decode" in r else "")
                  + f"; TTFT p50 {r['ttft_p50_s'] * 1e3:.0f} ms p99 {r['ttft_p99_s'] * 1e3:.0f} ms; "
                  f"TPOT p50 {r['tpot_p50_s'] * 1e3:.1f} ms p99 {r['tpot_p99_s'] * 1e3:.1f} ms; "
                  f"same tokens as msc run: {r['same_tokens_as_roles']}")
    from msc.bench import machine_info

    meta = {**machine_info(("torch", "triton", "transformers")), "gpu": gpu, "model": args.model,
            "layers": args.layers, "input_len": args.input_len, "output_len": args.output_len}
    for r in rows:
        r.pop("outputs", None)
    Path(args.out).write_text(json.dumps({"benchmark": "engine_step", "meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
