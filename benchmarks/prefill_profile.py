"""Where a prefill step's GPU time goes (colocated engine, Mixtral-8x7B shape, bf16, random weights): the
prompt steps of B prompts of --input-len tokens under torch.profiler, the top kernels by GPU time, and the
prefill rate against the model's matrix FLOPs.

    python benchmarks/prefill_profile.py --layers 16 --batch 64 --input-len 571 --out prefill_profile.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_step import MIXTRAL_8X7B, _bundle  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=571)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default="prefill_profile.json")
    args = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile

    from msc.engine.build import build_engine
    from msc.engine.request import SamplingParams

    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 32000, (args.batch, args.input_len), generator=g).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = _bundle(tmp, "mixtral", args.layers, args.batch, args.input_len + 64)
        gm = bundle.load_program(bundle.manifest["colocated"]["program"], "cuda", random_weights=True)
        eng = build_engine(bundle.manifest, gm, "cuda", prefix_caching=False)  # the same prompts run three times
        one = SamplingParams(max_tokens=1, ignore_eos=True)
        eng.generate(prompts[:16], one)  # warm-up: the prefill kernels compile
        torch.cuda.synchronize()
        t = time.perf_counter()
        eng.generate(prompts, one)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            eng.generate(prompts, one)
            torch.cuda.synchronize()
    tokens = args.batch * args.input_len
    c = MIXTRAL_8X7B
    h, i = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    per_layer = 2 * (h * (h + 2 * kv) + h * h) + 2 * c["num_experts_per_tok"] * 3 * h * i
    flops = tokens * (args.layers * per_layer + 2 * h * c["vocab_size"] / args.input_len)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=60)
    print(table)
    rows = [{"name": e.key, "cuda_ms": e.device_time_total / 1e3, "calls": e.count}
            for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[: args.top]]
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": args.layers, "batch": args.batch,
           "input_len": args.input_len, "prefill_s": wall, "tokens_per_s": tokens / wall,
           "tflops": flops / wall / 1e12, "top": rows}
    print(f"prefill of {args.batch} x {args.input_len} tokens: {wall:.3f} s = {tokens / wall:,.0f} tok/s, "
          f"{res['tflops']:.0f} TFLOP/s of matrix work")
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
