"""Benchmark (GPU): msc's fused MoE kernel against dense cuBLAS of the same FLOPs, torch._grouped_mm and
transformers' experts implementations, on a Mixtral-8x7B expert layer (H 4096, I 14336, E 8, top-2, bf16).

    python benchmarks/moe_kernel.py --out moe.json            # time the table of sizes
    python benchmarks/moe_kernel.py --tune --write-config     # tune tile sizes per token count, store them

Every variant is first checked against a float64 reference on the same random inputs. Times are medians of
CUDA-event timings (triton.testing.do_bench), then the median over --seeds routings. TFLOP/s counts
2·(T·K)·H·3I FLOPs (gate, up and down).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


H, I, E, K = 4096, 14336, 8, 2


def make_inputs(t: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(t, H, device="cuda", dtype=torch.bfloat16, generator=g)
    logits = torch.randn(t, E, device="cuda", generator=g)
    w, idx = torch.softmax(logits, -1).topk(K, -1)
    return x, idx, w


def make_weights(seed: int = 1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    gate_up = (torch.randn(E, 2 * I, H, device="cuda", generator=g) * H**-0.5).to(torch.bfloat16)
    down = (torch.randn(E, H, I, device="cuda", generator=g) * I**-0.5).to(torch.bfloat16)
    return gate_up, down


def reference(x, idx, w, gate_up, down):
    """float64 per expert (an independent computation)."""
    out = torch.zeros(x.shape[0], H, dtype=torch.float64, device=x.device)
    for e in range(E):
        rows, ks = torch.where(idx == e)
        if rows.numel() == 0:
            continue
        gu = x[rows].double() @ gate_up[e].double().T
        y = (F.silu(gu[:, :I]) * gu[:, I:]) @ down[e].double().T
        out.index_add_(0, rows, y * w[rows, ks, None].double())
    return out


def rel_err(out, ref) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def grouped_mm_direct(x, idx, w, gate_up_t, down_t):
    """The leanest torch._grouped_mm path: sort, two grouped GEMMs, weight, sum (weights pre-transposed)."""
    t = x.shape[0]
    flat = idx.reshape(-1)
    ids, perm = torch.sort(flat)
    counts = torch.histc(ids.int(), bins=E, min=0, max=E - 1)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    xs = x[perm // K]  # [A, H]
    gu = torch._grouped_mm(xs, gate_up_t, offs=offs)  # [A, 2I]
    h = F.silu(gu[:, :I]) * gu[:, I:]
    y = torch._grouped_mm(h, down_t, offs=offs)  # [A, H]
    y = y * w.reshape(-1)[perm, None].to(y.dtype)
    out = torch.zeros(t * K, H, dtype=y.dtype, device=x.device)
    out[perm] = y
    return out.view(t, K, H).sum(1)


def transformers_experts(gate_up, down):
    """transformers' own Mixtral experts module holding the same weights, and its experts functions."""
    from transformers import MixtralConfig
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K)
    with torch.device("meta"):
        mod = MixtralExperts(cfg)
    mod.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)
    mod.down_proj = torch.nn.Parameter(down, requires_grad=False)
    fns = {name: ALL_EXPERTS_FUNCTIONS[name] for name in ("grouped_mm", "batched_mm") if name in ALL_EXPERTS_FUNCTIONS}
    return mod, fns


def graphed(fn):
    """fn captured in a CUDA graph (after two warm-up calls on a side stream); its replay, or None."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn(), fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay
    except Exception as e:  # a host sync or an allocation pattern that graphs refuse
        print(f"  no CUDA graph: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
        torch.cuda.synchronize()
        return None


def bench(fn, rep_ms=200) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


# ---------------------------------------------------------------------------------------------- tuning
def tune(tokens, gate_up, down, tma_only: bool = False) -> dict:
    """Per token count: the full candidate search of backends/compute/moe_tune.py (BLOCK_M, TMA or not,
    per-kernel tiles, program order), timed on two routings; the table's current entry competes too, so
    re-tuning never makes a size slower."""
    from msc.backends.compute import moe_tune, triton_moe

    table = {}
    for t in tokens:
        # NOTE: two routings per candidate, so that a tile size that happens to suit one routing's expert
        # loads (decode sizes) does not win by luck
        inputs = [make_inputs(t, seed=t), make_inputs(t, seed=t + 7919)]

        def timed(cfg):
            try:
                return sum(bench(lambda: triton_moe.fused_moe(x, idx, w, gate_up, down, config=cfg), rep_ms=40)
                           for x, idx, w in inputs) / len(inputs)
            except Exception as e:  # out of shared memory / registers: not a candidate
                print(f"  skip {cfg}: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
                return float("inf")

        best, ms, current_ms = moe_tune.search(timed, t, K, E, triton_moe.pick_config(t, K, E), tma_only)
        print(f"tune T={t}: current {current_ms:.3f} ms -> {ms:.3f} ms {best}")
        table[t] = best
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", default="16,64,256,1024,4096,8192")
    ap.add_argument("--tune", action="store_true", help="tune tile sizes per token count first")
    ap.add_argument("--write-config", action="store_true", help="store the tuned table in backends/compute/moe_configs")
    ap.add_argument("--tma-only", action="store_true", help="tune among the TMA candidates (and the current entry) only")
    ap.add_argument("--seeds", type=int, default=3, help="routings timed per size (the median is reported)")
    ap.add_argument("--graphs", action="store_true", help="also time msc and grouped_mm replayed from CUDA graphs")
    ap.add_argument("--out", default="moe_kernel.json")
    args = ap.parse_args()
    import logging

    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("msc").setLevel(logging.INFO)  # first-use tuning says what it picked
    from msc.backends.compute import triton_moe

    tokens = [int(t) for t in args.tokens.split(",")]
    gate_up, down = make_weights()
    gate_up_t, down_t = gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()  # [E, H, 2I], [E, I, H]
    if args.tune:
        table = tune(tokens, gate_up, down, args.tma_only)
        if args.write_config:
            path = triton_moe.CONFIG_DIR / f"{triton_moe._gpu_key()}.json"
            old = json.loads(path.read_text())["configs"] if path.exists() else {}  # other sizes are kept
            path.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "triton": __import__("triton").__version__,
                                        "shape": {"H": H, "I": I, "E": E, "K": K},
                                        "configs": {**old, **{str(t): c for t, c in table.items()}}}, indent=1) + "\n")
            triton_moe.load_config_table.cache_clear()
            print(f"wrote {path}")
    mod, hf_fns = transformers_experts(gate_up, down)
    rows = []
    for t in tokens:
        a = t * K
        flops = 2 * a * H * 3 * I
        xa = torch.randn(a, H, device="cuda", dtype=torch.bfloat16)
        ha = torch.randn(a, I, device="cuda", dtype=torch.bfloat16)
        times: dict[str, list] = {}
        row = {"tokens": t, "flops": flops, "seeds": args.seeds}
        # NOTE: at decode sizes the time depends on the routing (how many experts are hit, how many BLOCK_M
        # tiles each needs), so each size is timed on several routings, the variants in a rotated order, and
        # the median over routings is reported.
        for s in range(args.seeds):
            x, idx, w = make_inputs(t, seed=100 + t + 1000 * s)
            variants = {
                "msc_triton": lambda: triton_moe.fused_moe(x, idx, w, gate_up, down),
                "torch_grouped_mm": lambda: grouped_mm_direct(x, idx, w, gate_up_t, down_t),
                "dense_cublas": lambda: (xa @ gate_up[0].T, ha @ down[0].T),  # same FLOPs, one expert's weights
            }
            for name, fn in hf_fns.items():
                variants[f"transformers_{name}"] = lambda fn=fn: fn(mod, x, idx, w)
            if args.graphs:  # decode steps replay CUDA graphs: the same two without host launch costs
                for name in ("msc_triton", "torch_grouped_mm"):
                    variants[f"{name}_graph"] = graphed(variants[name])
            ref = reference(x, idx, w, gate_up, down) if s == 0 else None
            names = list(variants)
            names = names[s % len(names):] + names[:s % len(names)]
            for name in names:
                fn = variants[name]
                if fn is None:
                    row[f"{name}_note"] = "could not be captured in a CUDA graph"
                    continue
                try:
                    # (a graph replays the eager variant's kernels, checked under that variant's name)
                    if ref is not None and name != "dense_cublas" and not name.endswith("_graph"):
                        err = rel_err(fn().float(), ref)
                        row[f"{name}_err"] = err
                        if not err < 2e-2:
                            raise AssertionError(f"{name} at T={t}: relative error {err:.3g}")
                    ms = bench(fn)
                    times.setdefault(name, []).append(ms)
                except torch.OutOfMemoryError:
                    row[f"{name}_note"] = "out of memory"
                torch.cuda.empty_cache()
            del variants, ref
        for name, ms_list in times.items():
            ms = sorted(ms_list)[len(ms_list) // 2]
            row[f"{name}_ms"], row[f"{name}_ms_per_seed"] = ms, ms_list
            row[f"{name}_tflops"] = flops / ms / 1e9
        rows.append(row)
        print(json.dumps(row))
    names = ["msc_triton", "torch_grouped_mm"] + [f"transformers_{n}" for n in hf_fns] + ["dense_cublas"]
    graph_names = ["msc_triton_graph", "torch_grouped_mm_graph"] if args.graphs else []
    print(f"\nmedian over {args.seeds} routings per size")
    print("| tokens | " + " | ".join(f"{n} ms (TFLOP/s)" for n in names + graph_names) + " | msc / cuBLAS | msc / best other |"
          + (" msc graph / grouped_mm graph |" if graph_names else ""))
    print("|---" * (len(names) + len(graph_names) + 3 + bool(graph_names)) + "|")
    for r in rows:
        cells = [f"{r[n + '_ms']:.3f} ({r[n + '_tflops']:.0f})" if r.get(n + "_ms") else "n/a" for n in names + graph_names]
        others = [r[n + "_ms"] for n in names[1:-1] if r.get(n + "_ms")]
        vs_dense = r["dense_cublas_ms"] / r["msc_triton_ms"]
        vs_best = min(others) / r["msc_triton_ms"] if others else float("nan")
        line = f"| {r['tokens']} | " + " | ".join(cells) + f" | {vs_dense:.2f} | {vs_best:.2f} |"
        if graph_names:
            g = r.get("torch_grouped_mm_graph_ms")
            line += f" {g / r['msc_triton_graph_ms']:.2f} |" if g and r.get("msc_triton_graph_ms") else " n/a |"
        print(line)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": __import__("triton").__version__,
            "transformers": __import__("transformers").__version__, "python": platform.python_version(),
            "shape": {"H": H, "I": I, "E": E, "K": K, "dtype": "bfloat16"}}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
