"""CPU cost of the M2N library per round, without any scheduling: every rank of an M = N exchange in one thread.

`msc bench m2n` measures what users see (latency across processes), but on a machine with fewer cores
than ranks that latency is mostly the library's CPU time per round divided by the cores (measured on a
2-core VM: a round at M = N = 2 costs as much at 2 KB as at 256 KB). This script isolates that CPU time:
all 2·M endpoints live in one process and one thread drives a round in dependency order (attention ranks
post receives and send, expert ranks receive and reply, attention ranks collect), so every wait finds its
message already there and the time is the library's own work: headers, tag matching, bookkeeping and the
copies.

    python benchmarks/m2n_cpu_cost.py [--transport shm] [--mn 2] [--sizes 2KB,256KB] [--rounds 2000] [--out f.json]

Prints a table (µs per round, per rank and per message, median of --repeats timings) and writes JSON
with the machine and versions.
"""
from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import torch
import torch.distributed as dist


def connect_all(transport: str, mn: int, buffer_bytes: int) -> dict:
    """2·mn endpoints of `transport` in this process (ranks < mn attention, the others experts)."""
    from msc.backends.comm import m2n

    store = dist.HashStore()
    eps, errors = {}, []

    def one(rank: int) -> None:
        peers = list(range(mn, 2 * mn)) if rank < mn else list(range(mn))
        try:
            eps[rank] = m2n.connect(transport, rank, peers, store, prefix="cost", timeout_s=30.0,
                                    buffer_bytes=buffer_bytes, borrow=True)
        except Exception as e:  # reported below, after every thread has ended
            errors.append(e)

    threads = [threading.Thread(target=one, args=(r,)) for r in range(2 * mn)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60.0)
    if errors or len(eps) != 2 * mn:
        raise RuntimeError(f"connecting {transport} endpoints failed: {errors or 'a connect did not return'}")
    return eps


def one_round(eps: dict, mn: int, x: torch.Tensor, tag: int) -> None:
    """Dispatch then combine, every rank driven in turn (the order in which their messages become ready)."""
    attention, experts = range(mn), range(mn, 2 * mn)
    pending = {}
    for a in attention:
        ep = eps[a]
        pending[a] = [ep.irecv(e, tag) for e in experts]
        ep.wait_all([ep.isend(e, [x], tag, flush=False) for e in experts])
    for e in experts:
        ep = eps[e]
        got = [ep.irecv(a, tag) for a in attention]
        ep.wait_all(got)
        ep.wait_all([ep.isend(a, [x], tag, flush=False) for a in attention])
        for h in got:
            h.release()
    for a in attention:
        eps[a].wait_all(pending[a])
        for h in pending[a]:
            h.release()


def measure(transport: str, mn: int, size: int, rounds: int, repeats: int, buffer_bytes: int) -> dict:
    eps = connect_all(transport, mn, buffer_bytes)
    try:
        x = torch.empty(size, dtype=torch.uint8).random_(0, 255)  # [S] bytes
        tag = 0
        for _ in range(max(50, rounds // 10)):  # warm-up: caches, header caches, ring pages
            one_round(eps, mn, x, tag)
            tag += 1
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(rounds):
                one_round(eps, mn, x, tag)
                tag += 1
            times.append((time.perf_counter() - t0) / rounds)
    finally:
        for ep in eps.values():
            ep.close()
    per_round = statistics.median(times) * 1e6
    messages = 2 * mn * mn
    return {"transport": transport, "mn": mn, "size": size, "us_per_round": per_round, "us_per_rank": per_round / (2 * mn),
            "us_per_message": per_round / messages, "repeats_us": [t * 1e6 for t in times]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--transport", default="shm", help="comma-separated: shm, tcp")
    ap.add_argument("--mn", default="2", help="comma-separated M = N values")
    ap.add_argument("--sizes", default="2KB,256KB")
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--buffer-bytes", type=int, default=4 << 20)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    from msc.bench import machine_info
    from msc.bench.m2n import parse_sizes

    rows = []
    for t in a.transport.split(","):
        for mn in (int(v) for v in a.mn.split(",")):
            for size in parse_sizes(a.sizes):
                rows.append(measure(t, mn, size, a.rounds, a.repeats, a.buffer_bytes))
                r = rows[-1]
                print(f"| {t} | {mn} | {size >> 10} KB | {r['us_per_round']:.1f} | {r['us_per_rank']:.1f} | {r['us_per_message']:.1f} |",
                      flush=True)
    if a.out:
        result = {"benchmark": "m2n_cpu_cost", "rows": rows,
                  "machine": machine_info(("torch",))}
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    print("| transport | M=N | size | µs per round | µs per rank | µs per message |\n|---|---|---|---|---|---|")
    main()
