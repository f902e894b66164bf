"""`msc bench m2n`: latency and throughput of the M2N transports against torch.distributed, side by side.

Pattern (one decode layer's traffic): M attention ranks each send S bytes to each of N expert ranks;
each expert rank, once it has all M messages, sends S bytes back to each attention rank. An iteration's
latency is measured at each attention rank from its first send to its last reply (a dispatch plus a
combine). Throughput is the bytes moved per iteration (2·M·N·S) over the median latency.

All transports run in the same processes and, for each size, take turns in blocks of iterations, so
they see the same machine state. torch.distributed is measured the way a user would call it (raw
`isend`/`irecv` of preallocated tensors, no framing); msc's transports carry their full message header.

With device="cuda" the messages are GPU tensors, rank r on GPU r mod (GPUs on the host): msc's `cuda_ipc`
against NCCL, both as grouped send/recv (`torch_dist`) and as two `all_to_all_single` calls a round
(`nccl_all_to_all`: dispatch, then combine, every rank in both). An iteration ends when the rank's
device has finished (torch.cuda.synchronize). NCCL needs a GPU per rank: with fewer GPUs than 2·M ranks
its rows are left out, with the reason in the result's `skipped`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from msc.bench import machine_info
from msc.errors import MscError

DEFAULT_SIZES = [2 << 10 << i for i in range(13)]  # 2 KB .. 8 MB
DEFAULT_MN = [1, 2, 4, 8]
DEFAULT_TRANSPORTS = ["shm", "tcp", "torch_dist"]
CPU_TRANSPORTS = ("shm", "tcp", "torch_dist", "rdma")
GPU_TRANSPORTS = ("cuda_ipc", "torch_dist", "nccl_all_to_all")
NCCL_TRANSPORTS = ("torch_dist", "nccl_all_to_all")  # on cuda; torch_dist runs gloo on cpu


def parse_sizes(text: str) -> list[int]:
    """Byte counts from a comma-separated list like "2048,2KB,8MB"; MscError naming a bad item."""
    units = {"b": 1, "k": 1 << 10, "kb": 1 << 10, "m": 1 << 20, "mb": 1 << 20}
    sizes = []
    for item in text.split(","):
        item = item.strip().lower()
        num = item.rstrip("kmb")
        unit = item[len(num):] or "b"
        if not num.isdigit() or unit not in units:
            raise MscError(f"--sizes item '{item}': expected a byte count like 2048, 2KB or 8MB")
        sizes.append(int(num) * units[unit])
    return sizes


def _iters(size: int, mn: int, scale: float) -> tuple[int, int]:
    """(warm-up, measured) iterations: many for small messages, fewer for large ones and many ranks."""
    n = 300 if size <= 256 << 10 else 100 if size <= 1 << 20 else 30
    n = max(10, int(n * scale / max(1, mn // 2)))
    return max(3, n // 10), n


def _barrier(store, key: str, world: int, timeout_s: float = 120.0) -> None:
    store.add(key, 1)
    deadline = time.monotonic() + timeout_s
    while store.add(key, 0) < world:
        if time.monotonic() > deadline:
            raise MscError(f"benchmark barrier {key} timed out")
        time.sleep(1e-3)


def _rank_main(rank: int, mn: int, port: int, cfg: dict) -> dict:
    """One rank of one M = N = mn run: every transport, every size."""
    from msc.backends.comm import m2n

    world = 2 * mn
    cuda = cfg.get("device", "cpu") == "cuda"
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timedelta(seconds=120))
    attention = rank < mn
    peers = list(range(mn, world)) if attention else list(range(mn))
    endpoints = {}
    for t in cfg["transports"]:
        if t in NCCL_TRANSPORTS:  # through the process group
            if not dist.is_initialized():
                dist.init_process_group("nccl" if cuda else "gloo", store=dist.PrefixStore("pg", store), rank=rank,
                                        world_size=world, timeout=timedelta(seconds=120),
                                        **({"device_id": device} if cuda else {}))
        else:
            # shm lends received tensors in place (borrow), as the runtime does; the others copy.
            endpoints[t] = m2n.connect(t, rank, peers, store, prefix=f"bench/{t}", timeout_s=120.0,
                                       buffer_bytes=cfg["buffer_bytes"], borrow=True, device=device.type)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    blocks = max(1, int(cfg.get("blocks", 5)))
    out: dict[str, dict[int, dict]] = {t: {} for t in cfg["transports"]}
    for size in cfg["sizes"]:
        x = torch.empty(size, dtype=torch.uint8).random_(0, 255).to(device)  # [S] bytes
        back = {p: torch.empty(size, dtype=torch.uint8, device=device) for p in peers}
        a2a = _all_to_all_buffers(rank, mn, size, device) if "nccl_all_to_all" in cfg["transports"] else None
        warm, iters = _iters(size, mn, cfg["scale"])

        def one_round(t: str, it: int) -> None:
            """One dispatch + combine over transport t (`it` tags the messages: the same on every rank)."""
            if t == "torch_dist":
                if cuda:  # NCCL: one group of point-to-point operations per direction
                    if attention:
                        ops = [dist.P2POp(dist.isend, x, p) for p in peers] + [dist.P2POp(dist.irecv, back[p], p) for p in peers]
                        for w in dist.batch_isend_irecv(ops):
                            w.wait()
                    else:
                        for w in dist.batch_isend_irecv([dist.P2POp(dist.irecv, back[p], p) for p in peers]):
                            w.wait()
                        for w in dist.batch_isend_irecv([dist.P2POp(dist.isend, x, p) for p in peers]):
                            w.wait()
                elif attention:
                    works = [dist.isend(x, p) for p in peers] + [dist.irecv(back[p], p) for p in peers]
                    for w in works:
                        w.wait()
                else:
                    for w in [dist.irecv(back[p], p) for p in peers]:
                        w.wait()
                    for w in [dist.isend(x, p) for p in peers]:
                        w.wait()
            elif t == "nccl_all_to_all":
                send, recv, (d_in, d_out), (c_in, c_out) = a2a
                dist.all_to_all_single(recv, send, d_out, d_in)  # dispatch: attention -> experts
                dist.all_to_all_single(send, recv, c_out, c_in)  # combine: experts -> attention
            else:
                ep = endpoints[t]
                recvs = [ep.irecv(p, it) for p in peers]
                if attention:
                    sends = [ep.isend(p, [x], it, flush=False) for p in peers]
                    ep.wait_all(recvs + sends)  # the wait rings the doorbells
                else:
                    ep.wait_all(recvs)
                    ep.wait_all([ep.isend(p, [x], it, flush=False) for p in peers])
                for h in recvs:
                    h.release()

        # NOTE: the transports take turns in `blocks` blocks of iterations (after a warm-up of each), not
        # one long run each: the machine's state drifts over seconds (on a shared VM by ±30 %), and a
        # transport measured only before or only after a drift would take it alone.
        seq = {t: 0 for t in cfg["transports"]}

        def untimed(t: str, rounds: int) -> None:
            for _ in range(rounds):
                sync()
                one_round(t, seq[t])
                seq[t] += 1

        for t in cfg["transports"]:
            _barrier(store, f"w/{size}/{t}", world)
            untimed(t, warm)
        lat: dict[str, list[float]] = {t: [] for t in cfg["transports"]}
        cpu = dict.fromkeys(cfg["transports"], 0.0)
        for blk in range(blocks):
            for t in cfg["transports"]:
                _barrier(store, f"b/{size}/{t}/{blk}", world)
                untimed(t, 2)  # the ranks leave the barrier up to a poll interval apart
                cpu0 = time.process_time()
                for _ in range(iters // blocks + (blk < iters % blocks)):
                    sync()
                    t0 = time.perf_counter()
                    one_round(t, seq[t])
                    sync()
                    if attention:
                        lat[t].append(time.perf_counter() - t0)
                    seq[t] += 1
                cpu[t] += time.process_time() - cpu0
        for t in cfg["transports"]:
            out[t][size] = {"lat": lat[t], "cpu_us": cpu[t] / iters * 1e6}
    for ep in endpoints.values():
        ep.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    return out


def _all_to_all_buffers(rank: int, mn: int, size: int, device):
    """Buffers and split sizes of one round's two all-to-alls (ranks 0..M-1 attention, M..2M-1 experts).

    Dispatch: each attention rank sends `size` bytes to every expert rank; combine: each expert rank sends
    `size` bytes to every attention rank. An attention rank's `send` is the dispatch's input and the
    combine's output; an expert's `recv` the dispatch's output and the combine's input (the other buffer
    is empty). Returns (send, recv, (dispatch in splits, dispatch out splits), (combine in, combine out))."""
    world = 2 * mn
    nothing = [0] * world
    if rank < mn:
        to_experts = [0] * mn + [size] * mn  # bytes per peer rank
        send = torch.empty(mn * size, dtype=torch.uint8).random_(0, 255).to(device)  # [M·S]
        recv = torch.empty(0, dtype=torch.uint8, device=device)
        return send, recv, (to_experts, nothing), (nothing, to_experts)
    to_attention = [size] * mn + [0] * mn
    send = torch.empty(0, dtype=torch.uint8, device=device)
    recv = torch.empty(mn * size, dtype=torch.uint8, device=device)  # [M·S]
    return send, recv, (nothing, to_attention), (to_attention, nothing)


def _stats(samples: list[float]) -> dict:
    s = sorted(samples)
    q = lambda f: s[min(len(s) - 1, int(f * len(s)))]  # noqa: E731
    return {"p50_us": q(0.5) * 1e6, "p99_us": q(0.99) * 1e6, "mean_us": sum(s) / len(s) * 1e6, "samples": len(s)}


def run(transports=None, sizes=None, mn_list=None, *, scale: float = 1.0, buffer_bytes: int = 16 << 20,
        timeout_s: float = 1800.0, progress=None, device: str = "cpu", blocks: int = 5) -> dict:
    """Run the benchmark grid on this machine; returns the JSON-able result."""
    sizes, mn_list = list(sizes or DEFAULT_SIZES), list(mn_list or DEFAULT_MN)
    if device not in ("cpu", "cuda"):
        raise MscError(f"msc bench m2n: device must be cpu or cuda, got {device!r}")
    allowed = GPU_TRANSPORTS if device == "cuda" else CPU_TRANSPORTS
    transports = list(transports or (GPU_TRANSPORTS if device == "cuda" else DEFAULT_TRANSPORTS))
    bad = [t for t in transports if t not in allowed]
    if bad:
        raise MscError(f"msc bench m2n on {device} runs transports {', '.join(allowed)}; got {bad}")
    gpus = 0
    if device == "cuda":
        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise MscError("msc bench m2n --device cuda: this machine has no CUDA device")
    cfg = {"transports": transports, "sizes": sizes, "scale": scale, "buffer_bytes": buffer_bytes, "device": device,
           "blocks": blocks}
    rows, skipped = [], []
    for mn in mn_list:
        world = 2 * mn
        run_cfg = cfg
        if device == "cuda" and world > gpus:  # NCCL refuses two ranks on one GPU
            left = [t for t in transports if t not in NCCL_TRANSPORTS]
            skipped += [{"transport": t, "mn": mn, "why": f"NCCL needs a GPU per rank: {world} ranks, {gpus} GPUs"}
                        for t in transports if t in NCCL_TRANSPORTS]
            if not left:
                continue
            run_cfg = {**cfg, "transports": left}
        store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=timedelta(seconds=120), wait_for_workers=False)
        with tempfile.TemporaryDirectory(prefix="msc-bench-") as tmp:
            procs = []
            for r in range(world):
                cmd = [sys.executable, "-m", "msc.bench.m2n", "--rank", str(r), "--mn", str(mn), "--port", str(store.port),
                       "--cfg", json.dumps(run_cfg), "--out", f"{tmp}/r{r}.json"]
                procs.append(subprocess.Popen(cmd, stdout=open(f"{tmp}/log{r}", "w"), stderr=subprocess.STDOUT,
                                              env={**os.environ, "OMP_NUM_THREADS": "1"}))
            deadline = time.monotonic() + timeout_s
            try:
                for r, p in enumerate(procs):
                    rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
                    if rc != 0:
                        raise MscError(f"benchmark rank {r} (M=N={mn}) failed: {Path(f'{tmp}/log{r}').read_text()[-2000:]}")
            except subprocess.TimeoutExpired:
                raise MscError(f"benchmark M=N={mn} did not finish within {timeout_s:.0f} s") from None
            finally:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            per_rank_all = [json.loads(Path(f"{tmp}/r{r}.json").read_text()) for r in range(world)]
            per_rank = per_rank_all[:mn]  # latency is measured at the attention ranks
        for size in sizes:
            for t in run_cfg["transports"]:
                samples = [v for res in per_rank for v in res[t][str(size)]["lat"]]
                st = _stats(samples)
                # CPU time per iteration summed over all 2·M ranks (the cores' real cost of one exchange)
                st["cpu_us_per_iter"] = sum(res[t][str(size)]["cpu_us"] for res in per_rank_all)
                st.update(transport=t, mn=mn, size=size, gbps=2 * mn * mn * size / (st["p50_us"] * 1e-6) / 1e9)
                rows.append(st)
        if progress:
            progress(mn)
    return {
        "benchmark": "m2n", "pattern": "M attention ranks -> N expert ranks -> back; latency per iteration at the attention ranks",
        "machine": machine_info(("torch",)),
        "config": cfg, "mn": mn_list, "rows": rows, "skipped": skipped,
        **({"gpus": [torch.cuda.get_device_name(i) for i in range(gpus)]} if gpus else {}),
    }


def ratios(result: dict, baseline: str = "torch_dist") -> list[dict]:  # on cuda, torch_dist is NCCL
    """Per (transport, M=N, size): p50 and p99 as a fraction of the baseline's, and throughput gain."""
    base = {(r["mn"], r["size"]): r for r in result["rows"] if r["transport"] == baseline}
    out = []
    for r in result["rows"]:
        b = base.get((r["mn"], r["size"]))
        if r["transport"] == baseline or b is None:
            continue
        out.append({"transport": r["transport"], "mn": r["mn"], "size": r["size"], "p50_ratio": r["p50_us"] / b["p50_us"],
                    "p99_ratio": r["p99_us"] / b["p99_us"], "throughput_gain": r["gbps"] / b["gbps"]})
    return out


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mns = result["mn"]
    fig, axes = plt.subplots(2, len(mns), figsize=(4 * len(mns), 7), squeeze=False)
    for j, mn in enumerate(mns):
        for t in result["config"]["transports"]:
            rows = [r for r in result["rows"] if r["mn"] == mn and r["transport"] == t]
            xs = [r["size"] / 1024 for r in rows]
            axes[0][j].plot(xs, [r["p50_us"] for r in rows], marker="o", label=f"{t} p50")
            axes[0][j].plot(xs, [r["p99_us"] for r in rows], linestyle="--", label=f"{t} p99")
            axes[1][j].plot(xs, [r["gbps"] for r in rows], marker="o", label=t)
        axes[0][j].set(xscale="log", yscale="log", title=f"M = N = {mn}: latency", xlabel="message KB", ylabel="µs")
        axes[1][j].set(xscale="log", title=f"M = N = {mn}: throughput", xlabel="message KB", ylabel="GB/s")
        axes[0][j].grid(True, which="both", alpha=0.3)
        axes[1][j].grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    axes[1][0].legend(fontsize=7)
    fig.suptitle(f"msc M2N on {result['machine']['cores']} cores ({result['machine']['platform']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _main() -> int:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--mn", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--cfg", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if os.environ.get("MSC_BENCH_PROFILE"):
        import cProfile
        prof = cProfile.Profile()
        res = prof.runcall(_rank_main, a.rank, a.mn, a.port, json.loads(a.cfg))
        prof.dump_stats(f"{os.environ['MSC_BENCH_PROFILE']}.{a.rank}")
    else:
        res = _rank_main(a.rank, a.mn, a.port, json.loads(a.cfg))
    Path(a.out).write_text(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
