"""Bandwidth of the paged decode-attention kernel on one GPU (needs the msc package installed and CUDA).

    python benchmarks/decode_attention.py --out /tmp/decode_attention.json [--batch 64,256] [--ctx 730] [--tune]

Measures (a) the device's copy bandwidth: a large device-to-device copy, bytes read + written, median of
triton.testing.do_bench; (b) backends/compute/triton_attention.paged_decode_attention for one
Mixtral-8x7B attention layer (nh 32, nkv 8, d 128, bf16, page 16), each sequence `ctx` tokens long and
scattered over random pages, at each batch size: median time, bytes moved (the context's K and V, plus q
and out), achieved GB/s and the fraction of the copy bandwidth; and torch SDPA (enable_gqa) on a
contiguous cache of the same size for comparison. Also checks the kernel's output against SDPA's.
--tune tries TILE / num_warps / num_stages / num_splits variants at each batch and prints the best (the
module constants DECODE_TILE, DECODE_NUM_WARPS, DECODE_NUM_STAGES are what to set from it).
Prints a table and writes JSON (GPU name, torch/triton versions, all rows) to --out.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math

import torch
import torch.nn.functional as F
import triton
import triton.testing

from msc.backends.compute import triton_attention as ta

NH, NKV, D, PAGE, DTYPE = 32, 8, 128, 16, torch.bfloat16
L2_BYTES = 60 << 20  # H200: 60 MB; only used to decide whether to rotate among several caches
TUNE_TILES, TUNE_WARPS, TUNE_STAGES, TUNE_SPLITS = (32, 64, 128), (4, 8), (1, 2, 3), (1, 2, 4, 8)


def _median_ms(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def copy_bandwidth(gib: float = 2.0) -> dict:
    """A device-to-device copy of `gib` GiB: bytes read + written per second."""
    n = int(gib * (1 << 30))
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src))
    return {"bytes": 2 * n, "ms": ms, "gbps": 2 * n / ms / 1e6}


class Case:
    """One decode step's inputs at batch `b`: paged caches (rotated if they would fit in L2), q, out."""

    def __init__(self, b: int, ctx: int, seed: int = 0):
        g = torch.Generator(device="cuda").manual_seed(seed)
        self.b, self.ctx = b, ctx
        per_seq = triton.cdiv(ctx, PAGE)
        num_blocks = b * per_seq
        self.kv_bytes = 2 * b * ctx * NKV * D * DTYPE.itemsize  # K and V actually read
        copies = max(1, math.ceil(4 * L2_BYTES / self.kv_bytes))
        self.caches = []
        for _ in range(copies):
            k = torch.randn(num_blocks, PAGE, NKV, D, generator=g, device="cuda").to(DTYPE)  # [blocks, page, nkv, d]
            v = torch.randn(num_blocks, PAGE, NKV, D, generator=g, device="cuda").to(DTYPE)
            perm = torch.randperm(num_blocks, generator=g, device="cuda")  # scattered pages, as after churn
            self.caches.append((k, v, perm.reshape(b, per_seq).to(torch.int32)))  # table [B, per_seq]
        self.seq_lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
        self.q = torch.randn(b, NH, D, generator=g, device="cuda").to(DTYPE)  # [B, nh, d]
        self.out = torch.empty(b, NH, D, device="cuda", dtype=DTYPE)
        self.bytes = self.kv_bytes + 2 * self.q.numel() * DTYPE.itemsize  # + q read + out written
        self.scale = D ** -0.5

    def kernel_fn(self, **cfg):
        cyc = itertools.cycle(self.caches)

        def fn():
            k, v, table = next(cyc)
            ta.paged_decode_attention(self.q, k, v, table, self.seq_lens, self.scale, out=self.out, **cfg)
        return fn

    def contiguous(self, i: int = 0):
        """The first cache gathered into contiguous [B, nkv, ctx, d] tensors (for SDPA)."""
        k, v, table = self.caches[i]
        idx = table.long()  # [B, per_seq]
        kc = k[idx].reshape(self.b, -1, NKV, D)[:, : self.ctx].transpose(1, 2).contiguous()  # [B, nkv, ctx, d]
        vc = v[idx].reshape(self.b, -1, NKV, D)[:, : self.ctx].transpose(1, 2).contiguous()
        return kc, vc


def sdpa_fn(case: Case):
    kc, vc = case.contiguous()
    q = case.q[:, :, None]  # [B, nh, 1, d]

    def fn():
        return F.scaled_dot_product_attention(q, kc, vc, scale=case.scale, enable_gqa=True)
    return fn


def check(case: Case, **cfg) -> float:
    """Relative error of the kernel against SDPA (float32) on the first cache."""
    kc, vc = case.contiguous()
    want = F.scaled_dot_product_attention(case.q[:, :, None].float(), kc.float(), vc.float(), scale=case.scale,
                                          enable_gqa=True)[:, :, 0]  # [B, nh, d]
    k, v, table = case.caches[0]
    got = ta.paged_decode_attention(case.q, k, v, table, case.seq_lens, case.scale, **cfg).float()
    return float((got - want).norm() / want.norm())


def measure(case: Case, copy_gbps: float, **cfg) -> dict:
    ms = _median_ms(case.kernel_fn(**cfg))
    gbps = case.bytes / ms / 1e6
    return {"ms": ms, "us": ms * 1e3, "gbps": gbps, "frac_copy": gbps / copy_gbps}


def tune(case: Case, copy_gbps: float) -> list[dict]:
    """Every TILE x num_warps x num_stages variant with the automatic split count, then the best with
    each explicit split count; rows sorted fastest first."""
    rows = []
    for tile, warps, stages in itertools.product(TUNE_TILES, TUNE_WARPS, TUNE_STAGES):
        cfg = dict(tile=tile, num_warps=warps, num_stages=stages)
        rows.append(_try(case, copy_gbps, cfg))
    ok = [r for r in rows if "ms" in r and not r.get("wrong")]
    if not ok:
        return rows
    best = min(ok, key=lambda r: r["ms"])
    for splits in TUNE_SPLITS:
        cfg = dict(best["cfg"], num_splits=splits)
        rows.append(_try(case, copy_gbps, cfg))
    return sorted(rows, key=lambda r: r.get("ms", float("inf")))


def _try(case: Case, copy_gbps: float, cfg: dict) -> dict:
    try:
        err = check(case, **cfg)
        row = {"cfg": cfg, "rel_err": err, **measure(case, copy_gbps, **cfg)}
        if err > 1e-2:
            row["wrong"] = True
    except Exception as e:  # a variant that does not compile (registers, shared memory) is just skipped
        row = {"cfg": cfg, "error": f"{type(e).__name__}: {str(e)[:200]}"}
    print(f"  tune b={case.b} {cfg}: " + (f"{row['us']:.1f} us {row['gbps']:.0f} GB/s err {row['rel_err']:.1e}"
                                         if "ms" in row else row["error"]), flush=True)
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="64,256", help="comma-separated batch sizes")
    ap.add_argument("--ctx", type=int, default=730, help="context tokens per sequence (571 prompt + 159 generated)")
    ap.add_argument("--out", default=None, help="JSON output path")
    ap.add_argument("--tune", action="store_true", help="also try TILE/num_warps/num_stages/num_splits variants")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("decode_attention.py needs a CUDA device")
    batches = [int(b) for b in args.batch.split(",") if b]

    result = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "shape": {"nh": NH, "nkv": NKV, "d": D, "page": PAGE, "dtype": str(DTYPE), "ctx": args.ctx},
        "config": {"tile": ta.DECODE_TILE, "num_warps": ta.DECODE_NUM_WARPS, "num_stages": ta.DECODE_NUM_STAGES},
        "copy": copy_bandwidth(), "rows": [], "tune": {},
    }
    copy_gbps = result["copy"]["gbps"]
    print(f"{result['gpu']}  torch {result['torch']}  triton {result['triton']}  copy {copy_gbps:.0f} GB/s", flush=True)
    for b in batches:
        case = Case(b, args.ctx)
        splits = ta.auto_num_splits(b, NKV, case.caches[0][2].shape[1] * PAGE, ta.DECODE_TILE, torch.device("cuda"))
        row = {"batch": b, "bytes": case.bytes, "num_splits": splits, "rel_err": check(case), **measure(case, copy_gbps)}
        try:
            sdpa_ms = _median_ms(sdpa_fn(case))
            row.update(sdpa_us=sdpa_ms * 1e3, sdpa_gbps=case.bytes / sdpa_ms / 1e6)
        except Exception as e:  # noqa: BLE001 - the comparison is optional
            row["sdpa_error"] = f"{type(e).__name__}: {e}"
        result["rows"].append(row)
        if args.tune:
            result["tune"][str(b)] = tune(case, copy_gbps)
        del case
        torch.cuda.empty_cache()

    print(f"\n{'batch':>6} {'MB':>8} {'splits':>6} {'us':>9} {'GB/s':>7} {'of copy':>8} {'SDPA us':>9} {'SDPA GB/s':>9} {'err':>8}")
    for r in result["rows"]:
        print(f"{r['batch']:>6} {r['bytes'] / 1e6:>8.1f} {r['num_splits']:>6} {r['us']:>9.1f} {r['gbps']:>7.0f} "
              f"{r['frac_copy']:>8.1%} {r.get('sdpa_us', float('nan')):>9.1f} {r.get('sdpa_gbps', float('nan')):>9.0f} "
              f"{r['rel_err']:>8.1e}")
    for b, rows in result["tune"].items():
        best = rows[0]
        print(f"best at batch {b}: {best['cfg']}  {best.get('us', float('nan')):.1f} us  {best.get('gbps', 0):.0f} GB/s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
