"""Hand-offs between two processes on one GPU through device flags (backends/comm/device_flags.py), against
the same work in one process.

Process A plays an attention role, process B an expert node: per layer, A computes (a matrix product sized
like `--a-ms`), signals B, waits for B; B waits, computes (`--b-ms`), signals back. Rows:
  rtt       no work: the round trip of two signal/wait pairs, launched one kernel at a time
  graph     L layers with work captured as one CUDA graph on each side, replayed per step
  one proc  the same products of both sides in one process, one graph (the colocated step)
Run it under MPS (benchmarks/gpu_run.sh mpson) and without to compare.

    python benchmarks/device_flags_pingpong.py --layers 16 --out device_flags.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _mm_for(ms: float, dev) -> tuple:
    """bf16 operands of a product that takes about `ms` on this GPU."""
    n = 4096
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    per = (time.perf_counter() - t) / 20 * 1e3
    rows = max(64, int(n * ms / per) // 64 * 64)
    return torch.randn(rows, n, device=dev, dtype=torch.bfloat16), b


def _graph_times(fn, steps: int, before=lambda r: None) -> list[float]:
    """Run fn once (warm-up), capture it as a CUDA graph, then the wall seconds of `steps` replays (before(r)
    runs ahead of replay r, outside the timing)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for r in range(steps):
        before(r)
        torch.cuda.synchronize()
        t = time.perf_counter()
        g.replay()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times


def _flags(timeout_s):
    from msc.backends.comm.device_flags import DeviceFlags

    return DeviceFlags(torch.zeros(1, dtype=torch.int64, device="cuda"), timeout_s)


def peer(q_in, q_out, args):
    """Process B: the expert side."""
    torch.cuda.set_device(0)
    fwd, ret = q_in.get()  # mapped from A
    fl = _flags(30)
    x, w = _mm_for(args.b_ms, "cuda")
    vals = torch.arange(1, args.iters + 1, dtype=torch.int64, device="cuda")
    q_out.put("ready")
    q_in.get()
    for i in range(args.iters):  # rtt
        fl.wait(fwd, 0, vals[i:])
        fl.signal(ret, 0, vals[i:])
    torch.cuda.synchronize()
    epoch = torch.zeros(1, dtype=torch.int64, device="cuda")
    out = torch.empty(x.shape[0], w.shape[1], device="cuda", dtype=torch.bfloat16)

    def step():
        for k in range(args.layers):
            fl.wait(fwd, 1 + k, epoch)
            torch.mm(x, w, out=out)
            fl.signal(ret, 1 + k, epoch)

    epoch.fill_(1)
    step()  # warm-up (A runs its warm-up too)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    for r in range(args.steps):
        epoch.fill_(2 + r)
        g.replay()
    torch.cuda.synchronize()
    q_out.put(int(fl.error.item()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--a-ms", type=float, default=0.9, help="A's compute per layer")
    ap.add_argument("--b-ms", type=float, default=0.4, help="B's compute per layer")
    ap.add_argument("--iters", type=int, default=500)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", default="device_flags.json")
    args = ap.parse_args()
    import os

    mp.set_start_method("spawn")
    torch.cuda.set_device(0)
    fwd = torch.zeros(64, dtype=torch.int64, device="cuda")  # A -> B
    ret = torch.zeros(64, dtype=torch.int64, device="cuda")  # B -> A
    q_in, q_out = mp.Queue(), mp.Queue()
    p = mp.Process(target=peer, args=(q_in, q_out, args))
    p.start()
    q_in.put((fwd, ret))
    fl = _flags(30)
    x, w = _mm_for(args.a_ms, "cuda")
    vals = torch.arange(1, args.iters + 1, dtype=torch.int64, device="cuda")
    assert q_out.get(timeout=120) == "ready"
    q_in.put("go")
    torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(args.iters):
        fl.signal(fwd, 0, vals[i:])
        fl.wait(ret, 0, vals[i:])
    torch.cuda.synchronize()
    rtt_us = (time.perf_counter() - t) / args.iters * 1e6
    epoch = torch.zeros(1, dtype=torch.int64, device="cuda")
    out = torch.empty(x.shape[0], w.shape[1], device="cuda", dtype=torch.bfloat16)

    def step():
        for k in range(args.layers):
            torch.mm(x, w, out=out)
            fl.signal(fwd, 1 + k, epoch)
            fl.wait(ret, 1 + k, epoch)

    epoch.fill_(1)
    times = _graph_times(step, args.steps, before=lambda r: epoch.fill_(2 + r))
    peer_err = q_out.get(timeout=120)
    p.join(60)
    # the same products in one process (B's operands rebuilt here at B's size)
    xb, wb = _mm_for(args.b_ms, "cuda")
    outb = torch.empty(xb.shape[0], wb.shape[1], device="cuda", dtype=torch.bfloat16)

    def colocated():
        for _ in range(args.layers):
            torch.mm(x, w, out=out)
            torch.mm(xb, wb, out=outb)

    one = _graph_times(colocated, args.steps)
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
           "mps": bool(os.environ.get("CUDA_MPS_PIPE_DIRECTORY")), "layers": args.layers,
           "rtt_us": rtt_us, "two_proc_step_ms": statistics.median(times) * 1e3,
           "one_proc_step_ms": statistics.median(one) * 1e3, "errors": [int(fl.error.item()), peer_err]}
    res["ratio"] = res["two_proc_step_ms"] / res["one_proc_step_ms"]
    print(f"GPU {res['gpu']}, MPS {'on' if res['mps'] else 'off'}, {args.layers} layers, A {args.a_ms} ms + B "
          f"{args.b_ms} ms a layer")
    print("| what | value |\n|---|---|")
    print(f"| round trip, no work (two signal/wait pairs) | {rtt_us:.1f} us |")
    print(f"| two processes, one graph each, step | {res['two_proc_step_ms']:.2f} ms |")
    print(f"| one process, one graph, step | {res['one_proc_step_ms']:.2f} ms |")
    print(f"| ratio | {res['ratio']:.3f} |  (wait errors: {res['errors']})")
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
