"""Bandwidth of the MLA latent decode kernel (backends/compute/triton_mla.py) on one GPU.

    python benchmarks/mla_decode.py --out /tmp/mla_decode.json [--batch 16,64,256] [--ctx 1024,4096] [--heads 128,16]

DeepSeek-V3's attention layer: r 512 latent + dr 64 rotary key values a token, bf16, page 16, each sequence
`ctx` tokens long on random pages; nh query heads per GPU (128 at tp 1, 16 at tp 8). For each case: the
device's copy bandwidth (a 2 GiB copy, read + written), then each launch variant (heads per program, tile,
warps; `--variants`) of paged_mla_decode: median time (triton.testing.do_bench), the cache bytes a step must
read (B·ctx·(r + dr)·2, plus q and out), achieved GB/s and its fraction of the copy bandwidth. Every variant's
output is checked against a float32 torch computation over the gathered pages (bf16 tolerance).
Prints a table and writes JSON (GPU, versions, rows) to --out.
"""
from __future__ import annotations

import argparse
import itertools
import json

import sys
from pathlib import Path

import torch

from msc.backends.compute import triton_mla

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_attention import _median_ms, copy_bandwidth  # noqa: E402  (the same timing and copy ceiling)

R, DR, PAGE, DTYPE = 512, 64, 16, torch.bfloat16


def case(b: int, ctx: int, nh: int, g: torch.Generator):
    blocks_per_seq = -(-ctx // PAGE)
    num_blocks = b * blocks_per_seq + 8
    cache = (torch.randn(num_blocks, PAGE, 1, R + DR, generator=g) * 0.5).to(DTYPE).cuda()
    table = torch.randperm(num_blocks, generator=g)[: b * blocks_per_seq].reshape(b, blocks_per_seq).to(torch.int32).cuda()
    lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
    q = (torch.randn(b, nh, R + DR, generator=g) * 0.5).to(DTYPE).cuda()
    return q, cache, table, lens


def reference(q, cache, table, lens, scale):
    """float32: each sequence's pages gathered, softmax over its keys, the latent averaged."""
    b = q.shape[0]
    toks = cache[table.long()].reshape(b, -1, R + DR).float()  # [B, S, r + dr] (every sequence ctx long)
    probs = torch.softmax(torch.einsum("bhd,bsd->bhs", q.float(), toks) * scale, dim=-1)
    return torch.einsum("bhs,bsr->bhr", probs, toks[..., :R])  # [B, nh, r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", default="16,64,256")
    ap.add_argument("--ctx", default="1024,4096")
    ap.add_argument("--heads", default="128,16", help="query heads per GPU (DeepSeek-V3: 128 at tp 1, 16 at tp 8)")
    ap.add_argument("--variants", default="16x32x4,16x64x4,16x32x8,32x32x8,64x16x8",
                    help="heads-per-program x tile x warps, comma separated (the first is the module default)")
    ap.add_argument("--out", default="mla_decode.json")
    args = ap.parse_args()
    from msc.bench import machine_info

    gbps_copy = copy_bandwidth()["gbps"]
    g = torch.Generator().manual_seed(0)
    scale = (128 + DR) ** -0.5
    variants = [tuple(int(x) for x in v.split("x")) for v in args.variants.split(",")]
    rows = []
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {gbps_copy:,.0f} GB/s")
    print("| heads | batch | ctx | variant (heads/prog x tile x warps) | us | GB/s | of copy | max err |")
    print("|---|---|---|---|---|---|---|---|")
    for nh, b, ctx in itertools.product(*([int(x) for x in a.split(",")] for a in (args.heads, args.batch, args.ctx))):
        q, cache, table, lens = case(b, ctx, nh, g)
        ref = reference(q, cache, table, lens, scale)
        nbytes = b * ctx * (R + DR) * 2 + q.numel() * 2 + b * nh * R * 2
        for hp, tile, warps in variants:
            try:
                fn = lambda: triton_mla.paged_mla_decode(q, cache, table, lens, R, scale, heads=hp, tile=tile,  # noqa: E731
                                                         num_warps=warps)
                err = (fn().float() - ref).abs().max().item()
                ms = _median_ms(fn)
            except Exception as e:  # a variant that does not compile (registers, shared memory) is reported, not fatal
                print(f"| {nh} | {b} | {ctx} | {hp}x{tile}x{warps} | failed: {type(e).__name__}: {str(e)[:80]} |")
                rows.append({"heads": nh, "batch": b, "ctx": ctx, "variant": [hp, tile, warps], "error": str(e)[:300]})
                continue
            gbps = nbytes / ms / 1e6
            rows.append({"heads": nh, "batch": b, "ctx": ctx, "variant": [hp, tile, warps], "ms": ms, "bytes": nbytes,
                         "gbps": gbps, "of_copy": gbps / gbps_copy, "max_abs_err": err})
            print(f"| {nh} | {b} | {ctx} | {hp}x{tile}x{warps} | {ms * 1e3:.1f} | {gbps:,.0f} | {gbps / gbps_copy:.0%} | {err:.1e} |")
        del q, cache, table, lens
        torch.cuda.empty_cache()
    meta = {**machine_info(("torch", "triton")), "gpu": torch.cuda.get_device_name(), "copy_gbps": gbps_copy,
            "r": R, "dr": DR, "page": PAGE, "dtype": "bfloat16"}
    with open(args.out, "w") as f:
        json.dump({"benchmark": "mla_decode", "meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
