"""Benchmark (several GPUs of one host; issue 8): a Mixtral-8x7B-shaped model disaggregated over the host's
GPUs as the planner chooses, against colocated instances, each next to the planner's prediction.

    python benchmarks/multi_gpu.py --gpus 8 --profile docs/results/profile_mixtral_8x7b_h200.json --out multi.json
    python benchmarks/multi_gpu.py --tiny --device cpu --gpus 4 --max-batch 6   # dry run of the same path

Disaggregated: the planner's best plan for `--gpus` H200s (tp 1, the runtime's one size) is compiled for
the meta device and run with `msc run`'s machinery (one process a role, each role on GPU LOCAL_RANK mod
count, random weights made on its GPU, cuda_ipc between them). Colocated: one instance of one GPU (the
planner's colocated baseline for a model that fits one GPU) runs the same bundle's colocated program in
the ColocatedEngine. Per-GPU throughput is batch / median decode step / GPUs used. The batch is the
planner's (largest meeting the TPOT target), capped by --max-batch (rounded up to whole micro-batches);
predictions are made at the batch run.
NOTE: unverified on several GPUs: written for issue 8 and dry-run on the CPU only.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch
from e2e_decode import MIXTRAL_8X7B  # the benchmarks' one Mixtral-8x7B shape (this folder is on sys.path)

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            num_local_experts=4, num_experts_per_tok=2)


def spec_dict(args) -> dict:
    config = {"model_type": "mixtral", **(TINY if args.tiny else MIXTRAL_8X7B), "num_hidden_layers": args.layers}
    d = {"model": {"config": config, "dtype": "float32" if args.tiny else "bfloat16"}, "device": "meta",
         "hardware": {"pool": {"gpu": "H200", "count": args.gpus, "per_node": max(args.gpus, 1)}},
         "workload": {"input_len": args.input_len, "output_len": args.output_len, "tpot_ms": args.tpot_ms},
         "runtime": {"timeout_s": 600}}
    if args.profile:
        d["planner"] = {"profile": args.profile}
    return d


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gpus", type=int, default=max(torch.cuda.device_count(), 1))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=571)
    ap.add_argument("--output-len", type=int, default=159)
    ap.add_argument("--tpot-ms", type=float, default=150.0)
    ap.add_argument("--profile", default=None, help="planner profile (msc profile) for the predictions")
    ap.add_argument("--max-batch", type=int, default=4096, help="cap on the batch actually run")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="a tiny Mixtral (dry runs on the CPU)")
    ap.add_argument("--out", default="multi_gpu.json")
    args = ap.parse_args()
    if args.tiny:
        args.layers = min(args.layers, 2)

    from msc.compiler import compile_spec
    from msc.planner.cost import cost_of_spec
    from msc.planner.perf import colocated_step
    from msc.planner.plan_spec import planner_for
    from msc.planner.search import side_of
    from msc.runtime.gpu_engine import ColocatedEngine
    from msc.runtime.launcher import run_bundle
    from msc.spec import parse_spec

    spec = parse_spec(spec_dict(args))
    cost, _ = cost_of_spec(spec)
    planner = planner_for(spec, cost, tp_sizes=(1,))
    result = planner.search(top=1)
    if not result.plans:
        sys.exit("the planner found no plan for this GPU count; see `msc plan`")
    best, colo = result.plans[0], result.colocated
    g = torch.Generator().manual_seed(0)
    vocab = spec.model.config["vocab_size"]
    rows = []

    # ---- disaggregated, as planned
    per_replica = max(1, min(best.b_a * best.m, args.max_batch // best.n_a))
    b_a = max(1, per_replica // best.m)
    batch = b_a * best.m * best.n_a
    plan = {"attention": {"replicas": best.n_a}, "experts": {"nodes": best.n_e}, "microbatches": best.m,
            "batch_size": b_a * best.m}
    d = spec_dict(args)
    d.pop("hardware")
    d["plan"] = plan
    prompts = torch.randint(3, vocab, (batch, args.input_len), generator=g).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = compile_spec(parse_spec(d), Path(tmp) / "b")
        res = run_bundle(bundle.path, prompts, args.output_len, random_weights=True, device=args.device,
                         timeout_s=3600)
        step = max(median(t) for t in res["decode_times"] if t)  # the slowest replica sets the pace
        predicted = planner.step(1, best.n_a, 1, best.n_e, best.m, b_a)
        rows.append({"config": best.describe(), "gpus": best.gpus, "batch": batch, "measured_step_s": step,
                     "predicted_step_s": predicted.total, "tokens_per_s_per_gpu": batch / step / best.gpus,
                     "predicted_per_gpu": batch / predicted.total / best.gpus, "transport": res["transport"]})
        print(json.dumps(rows[-1]))

        # ---- colocated: one instance of one GPU, the same bundle's colocated program
        cb = max(1, min(colo.batch if colo else 1, args.max_batch))
        dev = "cuda:0" if args.device == "cuda" else "cpu"
        engine = ColocatedEngine(bundle.load_program("colocated", dev, random_weights=True), args.layers, dev, max_batch=cb,
                                 max_seq_len=args.input_len + args.output_len + 16, cuda_graphs=args.device == "cuda")
        gen = engine.generate(torch.randint(3, vocab, (cb, args.input_len), generator=g).tolist(), args.output_len)
        side = side_of(planner.att_pool.gpu, 1)
        pred = colocated_step(cost, cb, planner.wl.mean_context, side, planner.eff, planner.profile)
        rows.append({"config": "colocated, 1 GPU", "gpus": 1, "batch": cb, "measured_step_s": gen.median_step_s,
                     "predicted_step_s": pred, "tokens_per_s_per_gpu": cb / gen.median_step_s, "predicted_per_gpu": cb / pred})
        print(json.dumps(rows[-1]))
    print("\n| config | GPUs | batch | step ms (measured) | step ms (planner) | error | tok/s/GPU | planner tok/s/GPU |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['gpus']} | {r['batch']} | {r['measured_step_s'] * 1e3:.1f} | "
              f"{r['predicted_step_s'] * 1e3:.1f} | {r['predicted_step_s'] / r['measured_step_s'] - 1:+.0%} | "
              f"{r['tokens_per_s_per_gpu']:,.0f} | {r['predicted_per_gpu']:,.0f} |")
    print(f"disaggregated / colocated per GPU: {rows[0]['tokens_per_s_per_gpu'] / rows[1]['tokens_per_s_per_gpu']:.2f}x "
          f"(planner: {rows[0]['predicted_per_gpu'] / rows[1]['predicted_per_gpu']:.2f}x)")
    meta = {"gpus_seen": torch.cuda.device_count(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "python": platform.python_version(), "args": vars(args)}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
