"""`msc profile`: measure a model's attention and expert times on this GPU and write the planner's profile.

The model of the spec is built with random weights on the GPU and run as a colocated program
(msc.runtime.gpu_engine). Two measurements give the paper's linear fits, per layer:
- the experts alone: the fused MoE kernel on one layer's weights for several token counts, uniform
  routing -> T_e = k3 · pairs + k4 (pairs: token-expert pairs the node computes);
- whole decode steps (CUDA-graph replays) over batch sizes at two context lengths. A step is
  head + Σ layers T_a + Σ MoE layers T_e, so T_a = (step - head - n_moe · T_e) / L, with the head's time
  from the planner's own model; T_a = k1 · b + k2 at the first context, and k1_ctx from the second.
Then it compares the planner's predicted colocated step (with the profile, and with the uncalibrated
roofline) against every measured step, so the report says how far each prediction was.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from msc.errors import MscError


@dataclass
class ProfileReport:
    profile: dict  # the Profile JSON
    rows: list[dict]  # per (batch, context): measured step, predictions and errors
    expert_rows: list[dict]
    meta: dict


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope and intercept, both clamped at >= 0 (the profile's fields are non-negative)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var > 0 else 0.0
    slope = max(slope, 0.0)
    return slope, max(my - slope * mx, 0.0)


def _time_experts(layer_weights, hidden: int, top_k: int, tokens: int) -> float:
    """Median seconds of the fused MoE kernel for `tokens` tokens routed uniformly at random."""
    from triton.testing import do_bench

    from msc.backends.compute.triton_moe import fused_moe

    gate_up, down = layer_weights
    e = gate_up.shape[0]
    x = torch.randn(tokens, hidden, device="cuda", dtype=gate_up.dtype)
    w, idx = torch.rand(tokens, e, device="cuda").topk(top_k, -1)
    return do_bench(lambda: fused_moe(x, idx, w, gate_up, down), warmup=10, rep=50, return_mode="median") / 1e3


def build_random_model(hf_config, dtype: torch.dtype):
    """The transformers model with random weights made directly on the GPU (nothing read from disk)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(hf_config, dtype=dtype).eval()


def run_profile(spec, *, batches: list[int], contexts: list[int], expert_tokens: list[int], gpu_name: str | None = None,
                say=print) -> ProfileReport:
    from msc.capture import DTYPES, capture
    from msc.colocated import from_hf_model
    from msc.compiler import load_hf_config
    from msc.ir import fetch_attr
    from msc.models import adapter_for
    from msc.ops import is_op
    from msc.planner.cost import model_cost
    from msc.planner.hardware import get_gpu, load_catalogue
    from msc.planner.perf import Efficiency, Profile, colocated_step, head_time
    from msc.planner.search import side_of
    from msc.runtime.gpu_engine import ColocatedEngine

    if not torch.cuda.is_available():
        raise MscError("msc profile measures a GPU and this machine has none (torch.cuda.is_available() is False)")
    if len(contexts) != 2 or contexts[0] >= contexts[1]:
        raise MscError(f"contexts {contexts}: give two increasing context lengths (the fit needs two)")
    hf_config = load_hf_config(spec)
    adapter = adapter_for(hf_config.model_type, hf_config)
    moe = adapter.moe_shape(hf_config)
    t0 = time.perf_counter()
    captured = capture(hf_config, adapter, spec.model.dtype)
    cost = model_cost(captured.gm, moe["top_k"], set(captured.constants))
    say(f"captured {hf_config.model_type} ({hf_config.num_hidden_layers} layers) in {time.perf_counter() - t0:.1f}s")
    model = build_random_model(hf_config, DTYPES[spec.model.dtype])
    gm = from_hf_model(captured, model, "cuda")
    engine = ColocatedEngine(gm, hf_config.num_hidden_layers, "cuda", max_batch=max(batches),
                             max_seq_len=max(contexts) + 64)
    catalogue = load_catalogue(spec.hardware.catalogue if spec.hardware else None)
    name = gpu_name or (spec.hardware.pool.gpu if spec.hardware and spec.hardware.pool else "H200")
    side = side_of(get_gpu(name, catalogue), 1)
    eff = Efficiency.model_validate({k: v for k, v in (spec.planner or {}).items()
                                     if k in Efficiency.model_fields})

    # ---- experts alone, on the first MoE layer's weights
    expert_node = next(n for n in captured.gm.graph.nodes if is_op(n, "experts"))
    weights = [fetch_attr(gm, a.target) for a in expert_node.args[3:5]]  # gate_up [E, 2I, H], down [E, H, I]
    expert_rows = []
    for t in expert_tokens:
        s = _time_experts(weights, moe["hidden_size"], moe["top_k"], t)
        expert_rows.append({"tokens": t, "pairs": t * moe["top_k"], "seconds": s})
        say(f"experts  tokens {t:>5}: {s * 1e3:8.3f} ms")
    k3, k4 = _fit([r["pairs"] for r in expert_rows], [r["seconds"] for r in expert_rows])
    t_e = lambda b: k3 * b * moe["top_k"] + k4  # noqa: E731  one MoE layer, b tokens, every expert local

    # ---- whole decode steps
    n_layers, n_moe = len(cost.layers), sum(1 for lc in cost.layers if lc.moe)
    steps = {}
    for ctx in contexts:
        for b in batches:
            steps[(b, ctx)] = engine.time_decode(b, ctx)
            say(f"decode   batch {b:>4} context {ctx:>5}: {steps[(b, ctx)] * 1e3:8.3f} ms")
    t_a = {key: (s - head_time(cost, key[0], side, eff) - n_moe * t_e(key[0])) / n_layers for key, s in steps.items()}
    k1, k2 = _fit(batches, [t_a[(b, contexts[0])] for b in batches])
    k1_ctx = max(0.0, sum((t_a[(b, contexts[1])] - t_a[(b, contexts[0])]) / (b * (contexts[1] - contexts[0]))
                          for b in batches) / len(batches))
    profile = Profile(gpu=torch.cuda.get_device_name(), model=f"{hf_config.model_type}:{n_layers}L",
                      context=float(contexts[0]), attention={"k1": k1, "k2": k2, "k1_ctx": k1_ctx},
                      expert={"k3": k3, "k4": k4, "experts": moe["num_experts"]}, tp=1)
    rows = []
    for (b, ctx), measured in steps.items():
        with_profile = colocated_step(cost, b, ctx, side, eff, profile)
        roofline = colocated_step(cost, b, ctx, side, eff)
        rows.append({"batch": b, "context": ctx, "measured_s": measured, "predicted_s": with_profile,
                     "error": with_profile / measured - 1, "roofline_s": roofline, "roofline_error": roofline / measured - 1})
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": __import__("triton").__version__,
            "transformers": __import__("transformers").__version__, "layers": n_layers, "dtype": spec.model.dtype}
    return ProfileReport(profile.model_dump(), rows, expert_rows, meta)


def write_profile(report: ProfileReport, out: str | Path) -> Path:
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(report.profile, indent=1) + "\n")
    tmp.replace(out)
    side = out.with_name(out.stem + ".report.json")
    side.write_text(json.dumps({"meta": report.meta, "steps": report.rows, "experts": report.expert_rows}, indent=1) + "\n")
    return out
