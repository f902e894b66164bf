"""Smoke test and latency table of the cuda_ipc transport on one GPU host (needs the msc package installed).

    python benchmarks/cuda_ipc_smoke.py --out /tmp/cuda_ipc_smoke.json [--gpu 0] [--iters 200]

Two worker processes on one GPU (spawned here, rendezvous through a TCPStore this process hosts) play
ping-pong: rank 0 sends a GPU message (uint8 payload of each size + an int64 [size, i] tag tensor),
rank 1 sends the same tensors back, rank 0 checks every byte and times the round trip. Sizes 2 KB .. 8 MB
by default, so the largest ones stream through the ring (buffer 4 MB unless --buffer-bytes).
Baseline: NCCL cannot run two ranks on one GPU, so the comparison is torch_dist over gloo with CPU
copies (GPU -> CPU, gloo send, CPU -> GPU on both sides): what "just use torch.distributed" costs here.
--no-baseline skips it. Prints p50 / p99 round-trip microseconds per size, writes JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import timedelta

SIZES = [2 << 10, 16 << 10, 128 << 10, 1 << 20, 4 << 20, 8 << 20]


def _pattern(size: int, device):
    import torch

    return ((torch.arange(size, device=device, dtype=torch.int64) * 7 + size) % 251).to(torch.uint8)


def _quantile(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def _pingpong(rank: int, send, recv, size: int, iters: int, warmup: int, device) -> list[float]:
    """Round-trip seconds of `iters` ping-pongs (rank 0's view; rank 1 echoes), checking every byte."""
    import torch

    x, rtts = _pattern(size, device), []
    for i in range(warmup + iters):
        meta = torch.tensor([size, i], dtype=torch.int64, device=device)
        if rank == 0:
            t0 = time.perf_counter()
            send([x, meta], i)
            y, m = recv(i)
            dt = time.perf_counter() - t0
            if not (torch.equal(y.to(x.device), x) and m.tolist() == [size, i]):
                raise SystemExit(f"rank 0: the echo of {size} bytes (iteration {i}) differs from what was sent")
            if i >= warmup:
                rtts.append(dt)
        else:
            y, m = recv(i)
            if (i == 0 or i == warmup + iters - 1) and not torch.equal(y.to(x.device), x):
                raise SystemExit(f"rank 1: the {size} bytes received (iteration {i}) differ from the pattern")
            send([y, m], i)
    return rtts


def worker(a) -> None:
    import torch
    import torch.distributed as dist

    from msc.backends.comm import m2n

    torch.cuda.set_device(a.gpu)
    dev, rank = torch.device("cuda", a.gpu), a.rank
    store = dist.TCPStore("127.0.0.1", a.port, 2, is_master=False, timeout=timedelta(seconds=60))
    ep = m2n.connect("cuda_ipc", rank, [1 - rank], store, timeout_s=60, device="cuda", prefix="smoke",
                     buffer_bytes=a.buffer_bytes)
    out = {"gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cuda_ipc": {}, "gloo_cpu": {}}
    for size in a.sizes:
        out["cuda_ipc"][size] = _pingpong(rank, lambda ts, t: ep.send(1 - rank, ts, t), lambda t: ep.recv(1 - rank, t),
                                          size, a.iters, a.warmup, dev)
    ep.close()
    if not a.no_baseline:
        dist.init_process_group("gloo", store=dist.PrefixStore("gloo/", store), rank=rank, world_size=2,
                                timeout=timedelta(seconds=120))
        tdep = m2n.connect("torch_dist", rank, [1 - rank], device="cpu", timeout_s=120)

        def send(ts, t):  # GPU tensors in: copy to the CPU, then gloo
            tdep.send(1 - rank, [x.cpu() for x in ts], t)

        def recv(t):  # ... and back onto the GPU on arrival
            return [x.to(dev) for x in tdep.recv(1 - rank, t)]

        for size in a.sizes:
            out["gloo_cpu"][size] = _pingpong(rank, send, recv, size, a.iters, a.warmup, dev)
        dist.destroy_process_group()
    with open(a.result, "w") as f:
        json.dump(out, f)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="where to write the JSON results (required unless --worker)")
    ap.add_argument("--gpu", type=int, default=0)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=SIZES, help="bytes, comma-separated")
    ap.add_argument("--buffer-bytes", type=int, default=4 << 20)
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return 0
    if not a.out:
        ap.error("--out is required")
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    with tempfile.TemporaryDirectory(prefix="cuda-ipc-smoke-") as tmp:
        procs, logs = [], [f"{tmp}/log.{r}" for r in range(2)]
        for r in range(2):
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--rank", str(r), "--port", str(store.port),
                   "--result", f"{tmp}/result.{r}.json", "--gpu", str(a.gpu), "--iters", str(a.iters), "--warmup",
                   str(a.warmup), "--sizes", ",".join(map(str, a.sizes)), "--buffer-bytes", str(a.buffer_bytes)]
            with open(logs[r], "w") as log:
                procs.append(subprocess.Popen(cmd + (["--no-baseline"] if a.no_baseline else []), stdout=log,
                                              stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}))
        deadline, failed = time.monotonic() + a.timeout, False
        for r, p in enumerate(procs):
            try:
                failed |= p.wait(timeout=max(1.0, deadline - time.monotonic())) != 0
            except subprocess.TimeoutExpired:
                failed = True
        for p in procs:
            if p.poll() is None:
                p.kill()
        if failed:
            for r in range(2):
                print(f"---- rank {r} (exit {procs[r].poll()}) ----\n{open(logs[r]).read()[-4000:]}", file=sys.stderr)
            print("FAILED", file=sys.stderr)
            return 1
        res = json.load(open(f"{tmp}/result.0.json"))
    table = {kind: {int(s): {"p50_us": _quantile(v, 0.5) * 1e6, "p99_us": _quantile(v, 0.99) * 1e6, "n": len(v)}
                    for s, v in res[kind].items()} for kind in ("cuda_ipc", "gloo_cpu")}
    print(f"{res['gpu']}, torch {res['torch']} (CUDA {res['cuda']}): round trip of a GPU message, 2 processes on GPU {a.gpu}")
    print(f"{'bytes':>10} | {'cuda_ipc p50':>12} {'p99':>9} {'GB/s':>6} | {'gloo+cpu p50':>12} {'p99':>9}")
    for s in a.sizes:
        c, g = table["cuda_ipc"][s], table["gloo_cpu"].get(s)
        base = f"{g['p50_us']:10.1f}us {g['p99_us']:7.1f}us" if g else f"{'-':>12} {'-':>9}"
        print(f"{s:>10} | {c['p50_us']:10.1f}us {c['p99_us']:7.1f}us {2 * s / c['p50_us'] / 1e3:6.2f} | {base}")
    with open(a.out, "w") as f:
        json.dump({"gpu": res["gpu"], "torch": res["torch"], "cuda": res["cuda"], "gpu_index": a.gpu, "iters": a.iters,
                   "buffer_bytes": a.buffer_bytes, "sizes": a.sizes, "round_trip": table}, f, indent=1)
    print(f"OK: every echo matched; results in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
