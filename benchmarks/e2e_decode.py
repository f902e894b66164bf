"""Benchmark (GPU): end-to-end greedy decode of a Mixtral-8x7B-shaped model (bf16, random weights made on the
GPU): msc colocated (paged KV, Triton kernels, CUDA graphs) against transformers' own `generate` with its
grouped_mm experts, on the same weights and batch, and against the roofline floor of a decode step.

    python benchmarks/e2e_decode.py --layers 16,32 --batch 64,256 --hf-layers 16 --hf-batch 64 --out e2e.json

Workload (the reference's): 571 prompt tokens, 159 new tokens, every token decoded (EOS ignored).
transformers' step time is (generate(1 + n) - generate(1)) / n at the same prompts, so its prefill is
excluded like msc's. The floor of a step: max(bytes / copy bandwidth, FLOPs / matmul peak), bytes = every
weight read once (the embedding: only the batch's rows) + the KV cache read at the mean context.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

MIXTRAL_8X7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                    num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
                    rope_theta=1e6)


def ceilings() -> dict:
    """Measured device copy bandwidth (bytes read + written) and bf16 matmul rate, medians."""
    from triton.testing import do_bench

    from decode_attention import copy_bandwidth  # this folder is on sys.path

    copy_bw = copy_bandwidth()["gbps"] * 1e9
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: x @ x, warmup=10, rep=100, return_mode="median")
    del x
    torch.cuda.empty_cache()
    return {"copy_bytes_per_s": copy_bw, "bf16_flops_per_s": 2 * 8192**3 / (ms / 1e3)}


def floor_step(cfg, batch: int, ctx: float, ceil: dict) -> dict:
    h, i, e, k, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok, cfg.num_hidden_layers
    nh, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, h // cfg.num_attention_heads
    attn = h * (nh * d) + 2 * h * (nkv * d) + (nh * d) * h
    hit = e * (1 - (1 - k / e) ** batch)  # expected distinct experts a batch touches
    weight_bytes = 2 * (L * (attn + hit * 3 * h * i + e * h + 2 * h) + h * cfg.vocab_size + batch * h)
    kv_bytes = 2 * batch * ctx * L * 2 * nkv * d
    flops = 2 * batch * (L * (attn + k * 3 * h * i) + h * cfg.vocab_size) + L * batch * 4 * nh * d * ctx
    t_bytes = (weight_bytes + kv_bytes) / ceil["copy_bytes_per_s"]
    t_flops = flops / ceil["bf16_flops_per_s"]
    return {"floor_s": max(t_bytes, t_flops), "bytes": weight_bytes + kv_bytes, "flops": flops,
            "bytes_s": t_bytes, "flops_s": t_flops}


def build(layers: int, experts_impl: str):
    from transformers import AutoModelForCausalLM, MixtralConfig

    cfg = MixtralConfig(**MIXTRAL_8X7B, num_hidden_layers=layers)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, experts_implementation=experts_impl)
    return cfg, model.eval()


def msc_engine(cfg, model, max_batch: int, max_seq_len: int):
    from msc.capture import capture
    from msc.colocated import from_hf_model
    from msc.models import adapter_for
    from msc.runtime.gpu_engine import ColocatedEngine

    t = time.perf_counter()
    captured = capture(cfg, adapter_for("mixtral", cfg), "bfloat16")
    gm = from_hf_model(captured, model, "cuda")
    engine = ColocatedEngine(gm, cfg.num_hidden_layers, "cuda", max_batch=max_batch, max_seq_len=max_seq_len)
    return engine, time.perf_counter() - t


def roles_step(layers: int, batch: int, prompts: list[list[int]], new_tokens: int, microbatches: int = 1) -> float:
    """msc disaggregated on this one GPU: one attention process and one expert process (cuda_ipc between
    them), random weights made by each role on the GPU; median decode step over the run."""
    import tempfile

    from msc.compiler import compile_spec
    from msc.runtime.launcher import run_bundle
    from msc.spec import parse_spec

    spec = parse_spec({"model": {"config": {"model_type": "mixtral", **MIXTRAL_8X7B, "num_hidden_layers": layers},
                                 "dtype": "bfloat16"}, "device": "meta",
                       "plan": {"attention": {"replicas": 1}, "experts": {"nodes": 1}, "microbatches": microbatches,
                                "batch_size": batch}, "runtime": {"timeout_s": 600}})
    with tempfile.TemporaryDirectory() as tmp:
        bundle = compile_spec(spec, f"{tmp}/b")
        res = run_bundle(bundle.path, prompts, new_tokens, random_weights=True, device="cuda", timeout_s=1200)
    steps = sorted(res["decode_times"][0])
    return steps[len(steps) // 2]


def hf_step(model, prompts: torch.Tensor, steps: int) -> float:
    """transformers generate: seconds per decode step, prefill excluded."""
    kw = dict(attention_mask=torch.ones_like(prompts), do_sample=False, pad_token_id=0, eos_token_id=None)

    def run(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(prompts, max_new_tokens=n, min_new_tokens=n, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    run(2)  # warm-up
    return (run(1 + steps) - run(1)) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", default="16,32")
    ap.add_argument("--batch", default="64,256")
    ap.add_argument("--input-len", type=int, default=571)
    ap.add_argument("--output-len", type=int, default=159)
    ap.add_argument("--hf-layers", default="16", help="layer counts at which transformers' generate also runs")
    ap.add_argument("--hf-batch", default="64")
    ap.add_argument("--hf-steps", type=int, default=16)
    ap.add_argument("--roles", action="store_true", help="also run msc as two role processes on the GPU (attention + experts)")
    ap.add_argument("--both-overlaps", action="store_true",
                    help="also run msc with the engine's step overlap flipped (on <-> off), side by side")
    ap.add_argument("--out", default="e2e_decode.json")
    args = ap.parse_args()
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    ceil = ceilings()
    print(f"ceilings: copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul {ceil['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s")
    rows = []
    for layers in ints(args.layers):
        cfg, model = build(layers, "grouped_mm")
        batches = ints(args.batch)
        engine, setup_s = msc_engine(cfg, model, max(batches), args.input_len + args.output_len + 16)
        for b in batches:
            g = torch.Generator().manual_seed(b)
            prompts = torch.randint(3, cfg.vocab_size, (b, args.input_len), generator=g)
            floor = floor_step(cfg, b, args.input_len + args.output_len / 2, ceil)
            overlaps = [engine.engine.overlap] + ([not engine.engine.overlap] if args.both_overlaps else [])
            first_tokens = None
            for overlap in overlaps:  # NOTE: the engine's default first (the row the docs quote)
                engine.engine.overlap = overlap
                res = engine.generate(prompts.tolist(), args.output_len)
                step = res.median_step_s
                same = None if first_tokens is None else res.tokens == first_tokens
                first_tokens = first_tokens or res.tokens
                row = {"layers": layers, "batch": b, "impl": "msc_colocated" + ("" if overlap else "_sequential_steps"),
                       "step_s": step, "tokens_per_s": b / step, "prefill_s": res.prefill_s, "setup_s": setup_s,
                       "floor_s": floor["floor_s"], "step_over_floor": step / floor["floor_s"], "floor": floor}
                if same is not None:  # the same greedy tokens with the overlap flipped (the same kernels, batches)
                    row["tokens_equal_to_first"] = same
                print(json.dumps(row))
                rows.append(row)
            engine.engine.overlap = overlaps[0]
            if layers in ints(args.hf_layers) and b in ints(args.hf_batch):
                try:
                    hs = hf_step(model, prompts.cuda(), args.hf_steps)
                    hrow = {"layers": layers, "batch": b, "impl": "transformers_generate_grouped_mm", "step_s": hs,
                            "tokens_per_s": b / hs, "floor_s": floor["floor_s"], "step_over_floor": hs / floor["floor_s"]}
                except torch.OutOfMemoryError:
                    hrow = {"layers": layers, "batch": b, "impl": "transformers_generate_grouped_mm", "note": "out of memory"}
                print(json.dumps(hrow))
                rows.append(hrow)
                torch.cuda.empty_cache()
            if args.roles:  # NOTE: runs while this process holds its own model: size the layers to fit twice
                rs = roles_step(layers, b, prompts.tolist(), args.output_len)
                rrow = {"layers": layers, "batch": b, "impl": "msc_two_role_processes", "step_s": rs, "tokens_per_s": b / rs,
                        "floor_s": floor["floor_s"], "step_over_floor": rs / floor["floor_s"]}
                print(json.dumps(rrow))
                rows.append(rrow)
        # NOTE: the engine, its CUDA graphs and the model hold each other in reference cycles: collect them
        # before the next (larger) model is made, or its weights do not fit.
        del engine, model
        import gc

        gc.collect()
        torch.cuda.empty_cache()
    print("\n| layers | batch | implementation | step ms | tokens/s | floor ms | step / floor |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "step_s" in r:
            print(f"| {r['layers']} | {r['batch']} | {r['impl']} | {r['step_s'] * 1e3:.2f} | {r['tokens_per_s']:,.0f} | "
                  f"{r['floor_s'] * 1e3:.2f} | {r['step_over_floor']:.2f} |")
        else:
            print(f"| {r['layers']} | {r['batch']} | {r['impl']} | {r['note']} | | | |")
    msc_rows = {(r["layers"], r["batch"]): r for r in rows if r["impl"] == "msc_colocated"}
    for r in rows:
        if r["impl"].startswith("transformers") and "step_s" in r:
            m = msc_rows[(r["layers"], r["batch"])]
            print(f"msc / transformers at {r['layers']} layers, batch {r['batch']}: {m['tokens_per_s'] / r['tokens_per_s']:.1f}x tokens/s")
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": __import__("triton").__version__,
            "transformers": __import__("transformers").__version__, "python": platform.python_version(),
            "ceilings": ceil, "workload": {"input_len": args.input_len, "output_len": args.output_len}}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
