"""Prompt (prefill) time of a state layer: msc's token-by-token recurrence against transformers' chunked form
started from the slot's state, side by side in one run (msc.runtime.sequence_state; MSC_STATE_PREFILL=loop|chunked,
whatever `auto` would pick).

    python benchmarks/state_prefill.py --out state_prefill.json [--tokens 256,1024,4096] [--device cpu|cuda]
    python benchmarks/state_prefill.py --per-channel ...        # Kimi's per-key-channel decay
    python benchmarks/state_prefill.py --op mamba2 ...          # Mamba-2's scan (Nemotron-H, Granite-4 hybrid)
    python benchmarks/state_prefill.py --op lightning ...       # MiniMax's lightning attention

The gated delta rule of one Qwen3-Next-80B-A3B layer by default (16 key heads, 32 value heads, 128-wide keys and
values); `--op mamba2`: a Mamba-2 scan of 128 heads of 64 channels, 8 groups, state 128 (Nemotron-H's shape);
`--op lightning`: 64 heads of 128 (MiniMax-Text-01's), per-head decays as MiniMax sets them.
One sequence whose whole prompt is one step; medians of --reps runs; the two outputs are checked against each
other first. Writes JSON (machine, versions, rows) to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="256,1024,4096")
    ap.add_argument("--op", default="delta", choices=["delta", "mamba2", "lightning"])
    ap.add_argument("--key-heads", type=int, default=16)
    ap.add_argument("--value-heads", type=int, default=32)
    ap.add_argument("--dk", type=int, default=128)
    ap.add_argument("--dv", type=int, default=128)
    ap.add_argument("--per-channel", action="store_true", help="Kimi's per-key-channel decay")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="state_prefill.json")
    args = ap.parse_args()
    from msc.bench import machine_info
    from msc.runtime.paged_kv import PagedKVCache, StepMeta
    from msc.runtime.sequence_state import SequenceStates, gated_delta_rule, linear_attention, mamba2_scan, state_key

    dev, hk, hv, dk, dv = args.device, args.key_heads, args.value_heads, args.dk, args.dv
    hk = hv if args.per_channel else hk
    rows = []
    heads, hd, groups, n_state = 128, 64, 8, 128  # --op mamba2
    if args.op == "mamba2":
        print(f"Mamba-2 scan, {heads} heads x {hd}, {groups} groups, state {n_state}, {dev}")
    elif args.op == "lightning":
        print(f"lightning attention, 64 heads x 128, {dev}")
    else:
        print(f"gated delta rule, {hk} key / {hv} value heads, dk {dk}, dv {dv}, "
              f"{'per-channel' if args.per_channel else 'per-head'} decay, {dev}")
    print("| tokens | recurrence ms | chunked ms | recurrence / chunked | max |diff| / max |y| |")
    print("|---|---|---|---|---|")
    for t in [int(x) for x in args.tokens.split(",")]:
        g = torch.Generator().manual_seed(t)
        if args.op == "mamba2":
            x = torch.randn(1, t, heads * hd, generator=g).to(dev)
            bm, cm = (torch.randn(1, t, groups * n_state, generator=g).to(dev) for _ in range(2))
            dtm = torch.randn(1, t, heads, generator=g).to(dev)
            a_log, dd, dt_bias = torch.rand(heads).to(dev), torch.randn(heads).to(dev), torch.randn(heads).to(dev)
            key, shape = state_key(0, "ssm"), (heads, hd, n_state)

            def run(states, meta):
                return mamba2_scan(states, meta, key, x, bm, cm, dtm, a_log, dd, dt_bias, heads, groups, 0.0, float("inf"))
        elif args.op == "lightning":
            q, k, v = (torch.randn(1, t, 64, 128, generator=g).to(dev) for _ in range(3))
            # MiniMax's slopes: 2^(-8 (h + 1) / H) per head, the decay exp(-slope) (its first layer's)
            log_decay = -(2.0 ** (-8.0 * torch.arange(1, 65) / 64)).to(dev)
            key, shape = state_key(0, "lin"), (64, 128, 128)

            def run(states, meta):
                return linear_attention(states, meta, key, q, k, v, log_decay)
        else:
            q, k = (torch.randn(1, t, hk, dk, generator=g).to(dev) for _ in range(2))
            v = torch.randn(1, t, hv, dv, generator=g).to(dev)
            gate = -F.softplus(torch.randn(1, t, hv, *((dk,) if args.per_channel else ()), generator=g)).to(dev)
            beta = torch.rand(1, t, hv, generator=g).to(dev)
            key, shape = state_key(0, "delta"), (hv, dk, dv)

            def run(states, meta):
                return gated_delta_rule(states, meta, key, q, k, v, gate, beta, True)
        times, outs = {}, {}
        for mode in ("loop", "chunked"):
            os.environ["MSC_STATE_PREFILL"] = mode
            samples = []
            for _ in range(args.reps):
                cache = PagedKVCache(1, t // 16 + 2, 16, 1, 16, 16, torch.float32, dev, t + 16)
                cache.states = SequenceStates({key: (shape, torch.float32)}, 2, dev)
                cache.add_sequence(0)
                meta = StepMeta.for_step(cache, [0], [0], [t])
                if dev == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                outs[mode] = run(cache.states, meta)
                if dev == "cuda":
                    torch.cuda.synchronize()
                samples.append(time.perf_counter() - t0)
            times[mode] = statistics.median(samples)
        diff = (outs["loop"] - outs["chunked"]).abs().max().item() / outs["loop"].abs().max().item()  # relative
        if not diff < 1e-4:
            raise AssertionError(f"T={t}: the two forms differ by {diff:.2e} of the output's largest value")
        row = {"tokens": t, "loop_s": times["loop"], "chunked_s": times["chunked"],
               "ratio": times["loop"] / times["chunked"], "max_rel_diff": diff}
        rows.append(row)
        print(f"| {t} | {times['loop'] * 1e3:.1f} | {times['chunked'] * 1e3:.1f} | {row['ratio']:.1f} | {diff:.1e} |")
    meta = {**machine_info(("torch", "transformers")), "device": dev, "op": args.op, "reps": args.reps,
            **({"heads": heads, "head_dim": hd, "groups": groups, "state": n_state} if args.op == "mamba2" else
               {"heads": 64, "head_dim": 128} if args.op == "lightning" else
               {"key_heads": hk, "value_heads": hv, "dk": dk, "dv": dv, "per_channel": args.per_channel})}
    with open(args.out, "w") as f:
        json.dump({"benchmark": "state_prefill", "meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
