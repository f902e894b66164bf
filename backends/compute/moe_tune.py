"""Tile sizes for the fused MoE kernel (triton_moe.py): the candidate search, and autotuning on first use.

A GPU with a committed tile table (moe_configs/<gpu>.json, written by `benchmarks/moe_kernel.py --tune
--write-config`) uses it. Any other GPU tunes each token bucket the first time a layer of that shape runs it,
announces it with one log line, and keeps the result on disk, keyed by the GPU, the Triton version and the
layer's shape (experts, hidden, intermediate, top-k, dtype), so later processes start tuned:

    $MSC_CACHE_DIR (default ~/.cache/msc)/moe_tiles/<gpu>/triton-<version>/E<e>_H<h>_I<i>_K<k>_<dtype>.json

MSC_MOE_AUTOTUNE=0 turns the first-use tuning off (the size heuristic then runs, and the log line says so); role
processes set it unless told otherwise (msc/runtime/worker.py: peers wait on their steps with a timeout), so tiles
come from a table or from what the colocated engine, `msc profile` or the benchmark tuned on this machine.
A call made while a CUDA graph is being captured cannot time anything: it takes the heuristic for that call
(the engine's eager warm-up steps before capture have normally tuned its buckets already).

NOTE: first use searches a short list around the kinds of tiles that won on the H200 (`quick`): compiling a
Triton variant costs about a second, so the full list (the benchmark's) would make a first step take minutes.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import threading
from pathlib import Path
from typing import Callable, Iterator

import torch

from msc import env as msc_env

log = logging.getLogger("msc.backends.compute.moe_tune")

# token counts a tuned entry is made for; a call uses the entry of the smallest bucket at or above its tokens
BUCKETS = (16, 64, 256, 1024, 4096, 8192)
_lock = threading.Lock()
_memory: dict[tuple, dict[int, dict | None]] = {}  # (gpu, E, H, I, K, dtype) -> {bucket: config, None: heuristic}
_announced: set[str] = set()
# NOTE: a layer whose experts' weights are smaller than this runs in microseconds with any tile: not worth a
# first step of tens of seconds (tiny test models run the heuristic)
MIN_TUNED_BYTES = 64 << 20


def bucket_of(tokens: int) -> int:
    return next((b for b in BUCKETS if b >= tokens), BUCKETS[-1])


# ---------------------------------------------------------------------------------------------- candidates
def candidate_configs(t: int, top_k: int, num_experts: int, tma_only: bool = False,
                      quick: bool = False) -> Iterator[tuple[int, bool, dict]]:
    """(BLOCK_M, tma, tile) candidates for one token count; `tile` is tried for each kernel in turn. `quick`:
    the short list of first-use tuning."""
    rows = t * top_k / max(num_experts, 1)
    # NOTE: while few rows reach each expert the layer is bound by reading the weights, and every extra
    # BLOCK_M tile of one expert reads its weights again: a BLOCK_M at or above the rows per expert wins.
    if rows < 256:
        bms = [16, 32, 64] if rows <= 16 else [32, 64, 128]
        if quick:
            bms = bms[:2]
        if not tma_only:
            for bm in bms:
                grid = ((64, 128), (64, 128), (4,), (4,)) if quick else ((64, 128), (64, 128), (4, 8), (3, 4))
                for bn, bk, warps, stages in itertools.product(*grid):
                    if bm == 128 and bk == 128 and stages == 4:
                        continue  # too much shared memory
                    yield bm, False, dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
        # TMA: wider k boxes stream the weights in longer contiguous runs. NOTE: the full search also tries the
        # largest BLOCK_M (one tile per expert where the routing is uneven, so no expert's weights are read twice)
        for bm in (bms[:2] if quick else bms):
            for bn, bk, stages in itertools.product((64, 128), (128, 256), (4,) if quick else (3, 4)):
                if bk == 256 and (bn == 128 or bm > 32):
                    continue  # too much shared memory
                if bm == 128 and bn == 128 and bk == 128 and stages == 4:
                    continue  # too much shared memory
                yield bm, True, dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=stages)
        return
    # compute-bound (prefill): 128-row tiles (64 never won), wider n tiles and deeper pipelines
    if not tma_only:
        grid = ((128, 256), (64,), (8,), (3, 4)) if quick else ((64, 128, 256), (32, 64), (4, 8), (3, 4, 5))
        for bn, bk, warps, stages in itertools.product(*grid):
            if bn == 256 and warps == 4:
                continue  # accumulators alone would take every register
            yield 128, False, dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    grid = ((128, 256), (8,), (3, 4), (0, 1)) if quick else ((64, 128, 256), (4, 8), (3, 4), (0, 1))
    for bn, warps, stages, persistent in itertools.product(*grid):
        if bn == 256 and warps == 4:
            continue
        yield 128, True, dict(BLOCK_N=bn, BLOCK_K=64, num_warps=warps, num_stages=stages, persistent=persistent)


def search(timed: Callable[[dict], float], t: int, top_k: int, num_experts: int, current: dict,
           tma_only: bool = False, quick: bool = False) -> tuple[dict, float, float]:
    """The lowest-time config for `t` tokens: (config, its time, `current`'s time). Coordinate search: each
    candidate tile is tried for one kernel with the best tile so far for the other; `current` (the table's
    entry or the heuristic) competes too, so a search never picks a slower config than it. `timed(cfg)` is the
    layer's time with that config (inf where it cannot run)."""
    best_per_key: dict = {"current": {**current, "ms": timed(current)}}
    for bm, tma, tile in candidate_configs(t, top_k, num_experts, tma_only, quick):
        for kernel in ("gate_up", "down"):
            if kernel == "gate_up" and tile["BLOCK_N"] == 256:
                continue  # two accumulators of 128 x 256 do not fit
            base = best_per_key.get((bm, tma)) or {"BLOCK_M": bm, "tma": tma, "gate_up": tile, "down": tile}
            cfg = {**{k: v for k, v in base.items() if k != "ms"}, kernel: tile}
            ms = timed(cfg)
            if (bm, tma) not in best_per_key or ms < best_per_key[(bm, tma)]["ms"]:
                best_per_key[(bm, tma)] = {**cfg, "ms": ms}
    best = min(best_per_key.values(), key=lambda c: c["ms"])
    for group_m in ((1, 16) if quick else (1, 4, 16)):  # program order (the default, 8, was used above)
        cfg = {**{k: v for k, v in best.items() if k != "ms"}, "GROUP_M": group_m}
        ms = timed(cfg)
        if ms < best["ms"]:
            best = {**cfg, "ms": ms}
    return {k: v for k, v in best.items() if k != "ms"}, best["ms"], best_per_key["current"]["ms"]


# ---------------------------------------------------------------------------------------------- first use
def cache_path(gpu: str, triton_version: str, num_experts: int, hidden: int, inter: int, top_k: int,
               dtype: torch.dtype) -> Path:
    root = msc_env.cache_dir()
    name = f"E{num_experts}_H{hidden}_I{inter}_K{top_k}_{str(dtype).removeprefix('torch.')}.json"
    return root / "moe_tiles" / gpu / f"triton-{triton_version}" / name


def _read(path: Path) -> dict[int, dict]:
    try:
        return {int(t): c for t, c in json.loads(path.read_text())["configs"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # absent or damaged: tuned again and rewritten


def _write(path: Path, configs: dict[int, dict], meta: dict) -> None:
    """Merged with what another process may have written meanwhile; written whole, then renamed."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**_read(path), **configs}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**meta, "configs": {str(t): c for t, c in sorted(merged.items())}}, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as e:  # a read-only home: tuned again next process, not an error
        log.warning("could not store the fused-MoE tiles in %s (%s); the next process tunes again", path, e)


def first_use_config(tokens: int, top_k: int, hidden: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                     gpu: str, timer: Callable[[Callable[[], object]], float] | None = None) -> dict | None:
    """The tuned config of `tokens`' bucket for this layer shape on this GPU (tuned now if no process has:
    see the module docstring), or None where none can be had (tuning off, or inside a CUDA-graph capture).
    `timer(fn)` times one call of fn in ms (default: triton.testing.do_bench's median)."""
    if gate_up.nbytes + down.nbytes < MIN_TUNED_BYTES:
        return None  # a tiny layer: the heuristic, silently
    e, two_i, h = gate_up.shape
    shape = (gpu, e, h, two_i // 2, top_k, hidden.dtype)
    b = bucket_of(tokens)
    table = _memory.get(shape)
    if table is not None and b in table:  # NOTE: the per-call path (every MoE layer of an eager step): no I/O, no lock
        return table[b]
    import triton

    from msc.backends.compute import triton_moe

    key_path = cache_path(gpu, triton.__version__, e, h, two_i // 2, top_k, hidden.dtype)
    with _lock:
        table = _memory.get(shape)
        if table is None:
            table = _memory[shape] = _read(key_path)
        if b in table:
            return table[b]
        off = not msc_env.switch("MSC_MOE_AUTOTUNE")
        capturing = hidden.is_cuda and torch.cuda.is_current_stream_capturing()
        if gpu not in _announced:
            _announced.add(gpu)
            if off:
                log.warning("no fused-MoE tile table for %s and MSC_MOE_AUTOTUNE=0: the kernel runs untuned "
                            "(a size heuristic)", gpu)
            else:
                log.warning("no fused-MoE tile table for %s: tuning each token bucket on first use (seconds each), "
                            "cached in %s", gpu, key_path.parent)
        if off:  # NOTE: a tuned entry on disk (read above) is used even when tuning is off
            table[b] = None  # the heuristic for this bucket, decided once
            return None
        if capturing:  # an eager call later may tune it
            return None
        if timer is None:
            from triton.testing import do_bench

            def timer(fn):
                return do_bench(fn, warmup=5, rep=20, return_mode="median")

        # NOTE: tuned on random routings of the bucket's size (two of them, so that a tile that suits one
        # routing's expert loads does not win by luck), with the layer's own weights
        g = torch.Generator(device=hidden.device).manual_seed(b)
        inputs = []
        for _ in range(2):
            x = torch.randn(b, h, generator=g, device=hidden.device).to(hidden.dtype)
            logits = torch.randn(b, e, generator=g, device=hidden.device)
            w, idx = torch.softmax(logits, -1).topk(top_k, -1)
            inputs.append((x, idx, w))

        def timed(cfg):
            try:
                return sum(timer(lambda: triton_moe.fused_moe(x, idx, w, gate_up, down, config=cfg))
                           for x, idx, w in inputs) / len(inputs)
            except Exception:  # out of shared memory / registers: not a candidate
                return float("inf")

        current = triton_moe.default_config(b, top_k, e)
        try:
            best, ms, current_ms = search(timed, b, top_k, e, current, quick=True)
        except Exception as exc:  # noqa: BLE001  a failed tuning must not fail the step: the heuristic runs
            log.warning("tuning the fused MoE on %s failed (%s: %s); the kernel runs untuned", gpu, type(exc).__name__, exc)
            table[b] = current
            return current
        table[b] = best
        log.info("fused MoE on %s, %d tokens: %.3f ms (heuristic %.3f ms) with %s", gpu, b, ms, current_ms, best)
        _write(key_path, {b: best}, {"gpu": gpu, "triton": triton.__version__,
                                     "shape": {"E": e, "H": h, "I": two_i // 2, "K": top_k, "dtype": str(hidden.dtype)}})
        return best
