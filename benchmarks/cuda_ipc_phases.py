"""Where a cuda_ipc round trip's time goes: per-phase timestamps of one dispatch + combine at M = N = 1.

Rank 0 (attention) sends a message to rank 1 (expert), which sends one back; both stamp each phase with
time.perf_counter_ns (one host clock for both processes) and the script prints the median timeline of a
round relative to rank 0's start:

    python benchmarks/cuda_ipc_phases.py [--size 256KB] [--rounds 300] [--out phases.json]

Phases, rank 0: isend returned (the copy into the peer's ring is queued) / send done (its control message
handed to shm once the copy finished) / reply received (copied out of our ring, delivered).
Rank 1: request received / isend returned / send done. Both ranks use GPU (rank mod GPUs).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist


def _rank(rank: int, port: int, size: int, rounds: int, out: str) -> None:
    from msc.backends.comm import m2n

    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=False, timeout=timedelta(seconds=120))
    # borrow, as the runtime and `msc bench m2n` connect: a message that arrives whole is lent in place
    ep = m2n.connect("cuda_ipc", rank, [1 - rank], store, prefix="phases", timeout_s=60.0, device="cuda", borrow=True)
    x = torch.randint(0, 255, (size,), dtype=torch.uint8, device=device)  # [S] bytes
    torch.cuda.synchronize()
    ns = time.perf_counter_ns
    stamps = []
    for it in range(rounds):
        if rank == 0:
            t0 = ns()
            h = ep.isend(1, [x], it)
            t1 = ns()
            ep.wait_all([h])
            t2 = ns()
            r = ep.irecv(1, it)
            (back,) = r.wait()
            t3 = ns()
            r.release()
        else:
            t0 = ns()
            r = ep.irecv(0, it)
            (got,) = r.wait()
            t1 = ns()
            h = ep.isend(0, [got], it)
            r.release()  # after the copy of `got` into rank 0's ring was queued on this stream
            t2 = ns()
            ep.wait_all([h])
            t3 = ns()
        stamps.append((t0, t1, t2, t3))
    torch.cuda.synchronize()
    ep.close()
    with open(out, "w") as f:
        json.dump(stamps, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="256KB")
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--out", default="cuda_ipc_phases.json")
    ap.add_argument("--profile", action="store_true", help="run the ranks under cProfile and print their top functions")
    ap.add_argument("--rank", type=int, default=-1, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--stamps", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    from msc.bench.m2n import parse_sizes

    (size,) = parse_sizes(a.size)
    if a.rank >= 0:
        if a.profile:  # where each rank's host time goes (cProfile), printed by the parent
            import cProfile

            cProfile.runctx("_rank(a.rank, a.port, size, a.rounds, a.stamps)", globals(), locals(), a.stamps + ".prof")
        else:
            _rank(a.rank, a.port, size, a.rounds, a.stamps)
        return
    if not torch.cuda.is_available():
        sys.exit("cuda_ipc_phases needs a CUDA device")
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, timeout=timedelta(seconds=120), wait_for_workers=False)
    files = [f"{a.out}.rank{r}" for r in range(2)]
    procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), "--port", str(store.port), "--size", a.size,
                               "--rounds", str(a.rounds), "--stamps", files[r]] + (["--profile"] if a.profile else []))
             for r in range(2)]
    for p in procs:
        if p.wait(timeout=600) != 0:
            sys.exit("a rank failed")
    s0, s1 = (json.load(open(f)) for f in files)
    skip = min(20, a.rounds // 5)  # first rounds: allocations, peer mappings
    rel = lambda s, i, k: (s[i][k] - s0[i][0]) / 1e3  # noqa: E731  µs after rank 0's start of round i
    med = lambda s, k: statistics.median(rel(s, i, k) for i in range(skip, a.rounds))  # noqa: E731
    rows = [("rank 0: isend returned", med(s0, 1)), ("rank 0: send done (control sent)", med(s0, 2)),
            ("rank 1: request received", med(s1, 1)), ("rank 1: isend returned", med(s1, 2)),
            ("rank 1: send done", med(s1, 3)), ("rank 0: reply received (round trip)", med(s0, 3))]
    print(f"cuda_ipc, {a.size}, median over {a.rounds - skip} rounds, µs after rank 0 starts a round")
    for name, v in rows:
        print(f"  {name:38s} {v:8.1f}")
    result = {"size": size, "rounds": a.rounds, "phases_us": dict(rows), "gpu": torch.cuda.get_device_name(),
              "torch": torch.__version__}
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {a.out}")
    if a.profile:
        import pstats

        for r in range(2):
            print(f"--- rank {r}: top functions by own time")
            pstats.Stats(files[r] + ".prof").sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
