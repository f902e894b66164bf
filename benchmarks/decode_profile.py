"""Where a decode step's GPU time goes (GPU): the colocated engine of `msc run --colocated` on a
Mixtral-8x7B-shaped bundle (bf16, random weights), its decode step replayed from the CUDA graph under
torch.profiler; every kernel put in a group (experts, attention, matmuls, norms, rotary, router, ...) with its
time and launches per layer, and the part of the step no kernel covers (launch gaps).

    python benchmarks/decode_profile.py --layers 16 --batch 64,256 --context 650 --out decode_profile.json

Run it twice with MSC_NORM_KERNEL=0 / 1 (or MSC_FUSE=0) to see a fusion's before and after; the floor column
is e2e_decode.py's roofline floor of the same step. `--real-steps N` also profiles N whole engine steps of real
requests (571-token prompts, then decode): the wall of a step against the GPU time in it, and the host-side
calls that take the rest.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_step import MIXTRAL_8X7B, _bundle  # noqa: E402

# NOTE: first match wins; the patterns are the kernel names Triton (function names), cuBLAS / CUTLASS and
# PyTorch's ATen kernels carry on Hopper with torch 2.11
GROUPS = [
    ("experts", r"moe|align|expert|gate_up|_down_"),
    ("attention", r"paged|decode_att|attention|flash|kv_write|store_kv|mla"),
    ("norm", r"rms|norm"),
    ("rotary", r"rotary|rope"),
    ("router", r"topk|softmax|sort|router|bitonic"),
    ("matmul", r"gemm|cutlass|xmma|nvjet|gemv|sm90|cublas|matmul"),
    ("copy / cat / index", r"copy|cat|index|gather|scatter|fill"),
    ("elementwise", r"elementwise|vectorized|unrolled|reduce"),
]


def group_of(name: str) -> str:
    low = name.lower()
    return next((g for g, pat in GROUPS if re.search(pat, low)), "other")


def profile_step(runner, batch: int, context: int, steps: int) -> dict:
    """Kernel times of `steps` replays of the decode graph of `batch` sequences at `context` tokens."""
    from torch.profiler import ProfilerActivity, profile

    with runner.synthetic_decode(batch, context) as replay:  # the decode graph's replay (what time_decode times)
        wall = runner.median_seconds(replay, steps, warmup=3)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                replay()
            torch.cuda.synchronize()
    kernels: dict[str, list] = defaultdict(lambda: [0.0, 0])  # name -> [seconds, launches]
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time > 0:
            k = kernels[ev.name]
            k[0] += ev.device_time / 1e6
            k[1] += 1
    return {"wall_s": wall, "kernels": {n: (s / steps, c / steps) for n, (s, c) in kernels.items()}}


def profile_real_steps(eng, batch: int, input_len: int, steps: int, top: int) -> dict:
    """N decode steps of `batch` real requests (prompts fed first, outside the profile): step wall, GPU kernel
    time within it, and the host-side calls by their own time."""
    from torch.profiler import ProfilerActivity, profile

    from msc.engine.request import SamplingParams

    g = torch.Generator().manual_seed(batch)
    # NOTE: as many new tokens as the engine's sequences hold, so that no request finishes (and the batch
    # does not drop to a smaller bucket, capturing its graph) inside the profiled steps; cancelled after them
    params = SamplingParams(max_tokens=eng.max_seq_len - input_len, ignore_eos=True)
    ids = [f"profile-{batch}-{i}" for i in range(batch)]
    for rid, p in zip(ids, torch.randint(3, 32000, (batch, input_len), generator=g).tolist()):
        eng.add_request(rid, p, params)
    while True:  # prompts in
        rec = eng.step()
        if not rec.prefill and not eng.scheduler.waiting:
            break
    for _ in range(3):
        eng.step()  # warm: every sequence decoding
    first = eng.step_no
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            eng.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    for rid in ids:
        eng.cancel(rid)
    while eng.has_work:  # the last step's tokens, still in flight with the engine's overlap, land (its seconds)
        eng.step()
    walls = [r.seconds for r in eng.records if r.step >= first][:steps]
    gpu = sum(ev.device_time for ev in prof.events()
              if ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time > 0) / 1e6 / steps
    host = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    return {"wall_s": statistics.median(walls), "gpu_s": gpu,
            "host_top": [{"name": e.key, "self_cpu_ms_a_step": e.self_cpu_time_total / 1e3 / steps,
                          "calls_a_step": e.count / steps} for e in host]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--batch", default="64,256")
    ap.add_argument("--context", type=int, default=650, help="tokens in every sequence's cache (571 + 159 / 2)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=25, help="kernels listed by name")
    ap.add_argument("--real-steps", type=int, default=0, help="also profile this many engine steps of real requests")
    ap.add_argument("--out", default="decode_profile.json")
    args = ap.parse_args()
    from e2e_decode import ceilings, floor_step
    from transformers import MixtralConfig

    from msc.engine.build import build_engine

    batches = [int(b) for b in args.batch.split(",")]
    cfg = MixtralConfig(**MIXTRAL_8X7B, num_hidden_layers=args.layers)
    ceil = ceilings()  # measured copy bandwidth and bf16 matmul rate, as e2e_decode.py's floor uses
    env = {k: os.environ[k] for k in ("MSC_NORM_KERNEL", "MSC_FUSE", "MSC_MOE_AUTOTUNE") if k in os.environ}
    res = {"meta": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "triton": __import__("triton").__version__, "python": platform.python_version(), "env": env,
                    "layers": args.layers, "context": args.context, **ceil},
           "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        bundle = _bundle(tmp, "mixtral", args.layers, max(batches), args.context + 64)
        gm = bundle.load_program(bundle.manifest["colocated"]["program"], "cuda", random_weights=True)
        eng = build_engine(bundle.manifest, gm, "cuda")
        for b in batches:
            p = profile_step(eng.runner, b, args.context, args.steps)
            floor = floor_step(cfg, b, args.context, ceil)["floor_s"]
            groups: dict[str, list] = defaultdict(lambda: [0.0, 0.0])
            for name, (s, c) in p["kernels"].items():
                groups[group_of(name)][0] += s
                groups[group_of(name)][1] += c
            busy = sum(s for s, _ in groups.values())
            launches = sum(c for _, c in groups.values())
            print(f"\nbatch {b}, context {args.context}, {args.layers} layers ({res['meta']['gpu']}, {env or 'defaults'}):"
                  f" step {p['wall_s'] * 1e3:.2f} ms, kernels {busy * 1e3:.2f} ms in {launches:.0f} launches "
                  f"({launches / args.layers:.1f} a layer), gaps {(p['wall_s'] - busy) * 1e3:.2f} ms; "
                  f"floor {floor * 1e3:.2f} ms, step / floor {p['wall_s'] / floor:.2f}")
            print("| group | ms a step | µs a layer | launches a layer | share |")
            print("|---|---|---|---|---|")
            for g, (s, c) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
                print(f"| {g} | {s * 1e3:.3f} | {s / args.layers * 1e6:.1f} | {c / args.layers:.1f} | {s / p['wall_s']:.1%} |")
            print(f"| (gaps) | {(p['wall_s'] - busy) * 1e3:.3f} | {(p['wall_s'] - busy) / args.layers * 1e6:.1f} | | "
                  f"{(p['wall_s'] - busy) / p['wall_s']:.1%} |")
            top = sorted(p["kernels"].items(), key=lambda kv: -kv[1][0])[: args.top]
            print("| kernel | group | µs a step | launches a step |")
            print("|---|---|---|---|")
            for name, (s, c) in top:
                print(f"| {name[:90]} | {group_of(name)} | {s * 1e6:.1f} | {c:.0f} |")
            res["rows"].append({"batch": b, "step_s": p["wall_s"], "kernel_s": busy, "launches": launches,
                                "floor_s": floor, "groups": {g: {"s": s, "launches": c} for g, (s, c) in groups.items()},
                                "kernels": [{"name": n, "s": s, "launches": c} for n, (s, c) in top]})
        for b in batches if args.real_steps else []:
            real = profile_real_steps(eng, b, args.context - 79, args.real_steps, 15)
            print(f"\nbatch {b}, real requests ({args.real_steps} decode steps): step wall {real['wall_s'] * 1e3:.2f} ms, "
                  f"GPU kernels {real['gpu_s'] * 1e3:.2f} ms a step, the rest {(real['wall_s'] - real['gpu_s']) * 1e3:.2f} ms")
            print("| host call | self ms a step | calls a step |")
            print("|---|---|---|")
            for h in real["host_top"]:
                print(f"| {h['name'][:80]} | {h['self_cpu_ms_a_step']:.3f} | {h['calls_a_step']:.1f} |")
            res.setdefault("real", []).append({"batch": b, **real})
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
