"""Expert-node time per MoE layer under a skewed routing: contiguous against balanced and replicated placement
(issue 24; passes/place_experts.py).

    python benchmarks/expert_placement.py --out expert_placement.json [--tokens 64,256,1024] [--nodes 4]
    python benchmarks/expert_placement.py --device cpu --hidden 64 --inter 128 --tokens 32   # smoke

One Mixtral-8x7B MoE layer (8 experts, top-2, hidden 4096, intermediate 14336, bf16, random weights) split over
--nodes expert nodes. A routing with the given skew (--hot: the share of pairs of experts 0 and 1, the rest even)
draws each token's top-2. For each strategy the placement is made from that routing's expected counts
(place_layer), the pairs are mapped to slots with msc::expert_slots (the attention side's op), and each node
runs msc::experts on the tokens sent to it with its own experts' weights (the expert side's op, first_expert its
first slot): median time per node (CUDA events; on the CPU, wall clock), every node of every strategy timed
in turns. The layer waits for its busiest node,
so the figure that matters is the maximum over nodes; the table gives it, the mean, and the ratio to
contiguous. Writes JSON (machine, versions, rows) to --out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _time_s(fn, device: str) -> float:
    if device == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / 1e3
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _medians_s(fns: list, device: str, reps: int) -> list[float]:
    """Median time of each fn. NOTE: the fns are timed in turns, in a rotated order each round, so that clock
    ramps and other drift over the run fall on all of them alike (timing one fn's reps in a row let two runs
    on the same GPU disagree by 40 %)."""
    for fn in fns:  # compile / warm up
        fn()
    times = [[] for _ in fns]
    for r in range(reps):
        order = list(range(len(fns)))
        order = order[r % len(fns):] + order[:r % len(fns)]
        for k in order:
            times[k].append(_time_s(fns[k], device))
    return [statistics.median(ts) for ts in times]


def routing(tokens: int, experts: int, hot: float, g: torch.Generator) -> torch.Tensor:
    """[T, 2] distinct expert ids per token: experts 0 and 1 take `hot` of the pairs, the rest share the remainder."""
    p = torch.full((experts,), (1 - hot) / (experts - 2))
    p[:2] = hot / 2
    return torch.multinomial(p.expand(tokens, -1), 2, replacement=False, generator=g)  # [T, 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tokens", default="64,256,1024")
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=14336)
    ap.add_argument("--hot", type=float, default=0.7, help="share of the pairs experts 0 and 1 take together")
    ap.add_argument("--replicas-per-node", type=int, default=1)
    ap.add_argument("--reps", type=int, default=40, help="timings per node and strategy (the median is reported)")
    ap.add_argument("--out", default="expert_placement.json")
    args = ap.parse_args()
    import msc.ops  # noqa: F401  (registers the msc ops)
    from msc.bench import machine_info
    from msc.ops import slot_tables
    from msc.passes.place_experts import place_layer

    dev, dtype = args.device, torch.bfloat16 if args.device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    e, h, i = args.experts, args.hidden, args.inter
    gate_up = (torch.randn(e, 2 * i, h, generator=g) * 0.02).to(dtype).to(dev)  # [E, 2I, H]
    down = (torch.randn(e, h, i, generator=g) * 0.02).to(dtype).to(dev)  # [E, H, I]
    rows = []
    gpu = torch.cuda.get_device_name() if dev == "cuda" else "none"
    print(f"{gpu}: one MoE layer E={e} H={h} I={i}, {args.nodes} expert nodes, experts 0-1 take {args.hot:.0%} of the pairs")
    print("| tokens | strategy | busiest node ms | mean node ms | busiest / contiguous | expected max/mean |")
    print("|---|---|---|---|---|---|")
    for t in [int(x) for x in args.tokens.split(",")]:
        idx = routing(t, e, args.hot, g).to(dev)  # [T, 2]
        w = torch.full((t, 2), 0.5, dtype=torch.float32, device=dev)
        x = (torch.randn(t, h, generator=g) * 0.5).to(dtype).to(dev)
        counts = torch.bincount(idx.reshape(-1).cpu(), minlength=e).float().tolist()
        placed, fns = [], []
        for strategy in ("contiguous", "balanced", "replicated"):
            p = place_layer(strategy, counts, e, args.nodes, args.replicas_per_node)
            slot_of, cum, copies = slot_tables(p.slots, p.shares, e)
            slots = torch.ops.msc.expert_slots(idx, 1, slot_of, cum, copies)  # [T, 2]
            placed.append((strategy, p))
            for j in range(args.nodes):
                lo, hi = p.bounds[j], p.bounds[j + 1]
                mine = ((slots >= lo) & (slots < hi)).any(-1).nonzero().squeeze(1)  # tokens sent to node j
                experts_j = torch.tensor(p.slots[lo:hi], device=dev)
                gu_j, dn_j = gate_up[experts_j].contiguous(), down[experts_j].contiguous()  # its slots' weights
                xs, ids, ws = x[mine], slots[mine], w[mine]
                fns.append(lambda xs=xs, ids=ids, ws=ws, gu_j=gu_j, dn_j=dn_j, lo=lo:
                           torch.ops.msc.experts(xs, ids, ws, gu_j, dn_j, 1, lo))
        medians = _medians_s(fns, dev, args.reps)
        base = None
        for k, (strategy, p) in enumerate(placed):
            node_s = medians[k * args.nodes:(k + 1) * args.nodes]
            busiest, mean = max(node_s), statistics.mean(node_s)
            base = base or busiest
            row = {"tokens": t, "strategy": strategy, "node_s": node_s, "busiest_s": busiest, "mean_s": mean,
                   "vs_contiguous": busiest / base, "expected_imbalance": p.imbalance(counts), "slots": p.slots,
                   "bounds": p.bounds}
            rows.append(row)
            print(f"| {t} | {strategy} | {busiest * 1e3:.3f} | {mean * 1e3:.3f} | {busiest / base:.2f} | "
                  f"{p.imbalance(counts):.2f} |")
        del fns
    meta = {**machine_info(("torch", "triton")), "gpu": gpu, "experts": e, "hidden": h, "inter": i,
            "nodes": args.nodes, "hot": args.hot, "replicas_per_node": args.replicas_per_node, "dtype": str(dtype),
            "reps": args.reps, "moe_autotune": __import__("os").environ.get("MSC_MOE_AUTOTUNE", "1")}
    with open(args.out, "w") as f:
        json.dump({"benchmark": "expert_placement", "meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
