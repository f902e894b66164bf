"""`msc profile`: measure a model's attention and expert times on this GPU and write the planner's profile.

The model of the spec is built with random weights on the GPU and run on the engine (msc.engine), as
`msc run --colocated` and `msc serve` run it. Three measurements give the fits, per layer:
- the experts alone: the fused MoE kernel on one layer's weights for several token counts, uniform
  routing -> T_e = k3 · pairs + k4 (pairs: token-expert pairs the node computes);
- whole decode steps as the engine runs them (wall time of steps in which every one of b sequences
  decodes: scheduling, step metadata, the CUDA-graph replay and sampling) over batch sizes at two
  context lengths. A step is head + Σ layers T_a + Σ MoE layers T_e, so T_a = (step - head - n_moe · T_e) / L,
  with the head's time from the planner's own model; T_a = k1 · b + k2 at the first context, and k1_ctx
  from the second. The engine's host work per step thus sits in the attention fit (it runs there);
- with `roles` (the default), the same decode steps by two role processes on this GPU (one attention
  replica, one expert node; the device exchange under CUDA MPS where the machine has it): what a step costs
  beyond the colocated one, over the two hand-offs of each MoE layer and beyond the link model's own time,
  is the profile's `exchange.handoff_s`.
Then it compares the planner's predicted colocated step (with the profile, and with the uncalibrated
roofline) against every measured step, and the predicted two-role step against the measured one.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from msc.errors import MscError


@dataclass
class ProfileReport:
    profile: dict  # the Profile JSON
    rows: list[dict]  # per (batch, context): measured step, predictions and errors
    expert_rows: list[dict]
    meta: dict
    roles_rows: list[dict] = field(default_factory=list)  # per batch: two role processes, measured vs predicted


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


PROMPT_TOKENS_PER_STEP = 16384  # the engine's token budget a step, colocated and in the roles (ColocatedEngine's default)


def _engine_decode_step(engine, batch: int, ctx: int, new: int, vocab: int, gen: torch.Generator) -> float:
    """Median wall time of the engine's decode steps in which all `batch` sequences decode, around context
    `ctx` (prompts of ctx - new/2 tokens, `new` tokens each: the prompts enter over several steps, then the
    full-batch decode steps come)."""
    from msc.engine.request import SamplingParams

    prompts = torch.randint(3, vocab, (batch, max(1, ctx - new // 2)), generator=gen).tolist()
    first = engine.step_no
    engine.generate(prompts, SamplingParams(max_tokens=new, ignore_eos=True))
    full = [r.seconds for r in engine.records if r.step >= first and not r.prefill and len(r.decode) == batch]
    if not full:
        raise MscError(f"msc profile: no decode step held all {batch} sequences (the engine's batch limit?)")
    return sorted(full)[len(full) // 2]


def _roles_decode_steps(spec, batches: list[int], ctx: int, new_tokens, longest: int, vocab: int, say
                        ) -> tuple[dict[int, float], str]:
    """{batch: median full-batch decode step} of two role processes on this GPU (1 attention replica, 1 expert
    node, m = 1, random weights), and how they exchanged tokens."""
    import shutil
    import tempfile

    from msc.compiler import compile_spec
    from msc.runtime.launcher import run_bundle
    from msc.runtime.mps import CONTROL
    from msc.spec import parse_spec

    d = spec.model_dump(mode="json", exclude_none=True)
    d["device"] = "meta"  # compiled without weights; each role makes random ones on the GPU
    d["plan"] = {"attention": {"replicas": 1}, "experts": {"nodes": 1}, "microbatches": 1, "batch_size": max(batches)}
    d["runtime"] = {**d.get("runtime", {}), "max_seq_len": longest, "kv_cache_tokens": max(batches) * longest,
                    "max_step_tokens": PROMPT_TOKENS_PER_STEP}  # the colocated engine's budget: the same step shapes
    mps = {"attention": 100, "expert": 100} if shutil.which(CONTROL) else None
    how = "device exchange under CUDA MPS" if mps else "host exchange (no CUDA MPS on this machine)"
    gen = torch.Generator().manual_seed(1)
    out = {}
    with tempfile.TemporaryDirectory(prefix="msc-profile-") as tmp:
        bundle = compile_spec(parse_spec(d), Path(tmp) / "roles")
        for b in batches:
            new = new_tokens(b, ctx)
            prompts = torch.randint(3, vocab, (b, max(1, ctx - new // 2)), generator=gen).tolist()
            res = run_bundle(bundle.path, prompts, new, random_weights=True, device="cuda", microbatches=1,
                             sampling=[{"ignore_eos": True}] * b, mps=mps, env={"MSC_STAGE_GRAPHS": "on"})
            full = [r["seconds"] for r in res["records"][0] if not r["prefill"] and len(r["decode"]) == b]
            if not full:
                raise MscError(f"msc profile: the roles ran no decode step with all {b} sequences")
            out[b] = sorted(full)[len(full) // 2]
            say(f"roles    batch {b:>4} context {ctx:>5}: {out[b] * 1e3:8.3f} ms ({how})")
    return out, how


def build_random_model(hf_config, dtype: torch.dtype):
    """The transformers model with random weights made directly on the GPU (nothing read from disk)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(hf_config, dtype=dtype).eval()


def run_profile(spec, *, batches: list[int], contexts: list[int], expert_tokens: list[int], gpu_name: str | None = None,
                roles: bool = True, say=print) -> ProfileReport:
    from msc.capture import DTYPES, capture
    from msc.colocated import from_hf_model
    from msc.compiler import load_hf_config
    from msc.ir import fetch_attr
    from msc.models import adapter_for
    from msc.ops import is_op
    from msc.planner.cost import model_cost
    from msc.planner.hardware import get_gpu, load_catalogue
    from msc.planner.perf import (Efficiency, ExchangeFit, Profile, colocated_step, comm_time, disaggregated_step,
                                  head_time)
    from msc.planner.search import over_nvlink, side_of
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
    budget = PROMPT_TOKENS_PER_STEP
    new_tokens = lambda b, ctx: -(-b * ctx // budget) + 8  # noqa: E731  prompts enter over several steps, then 8 full ones
    longest = max(contexts) + new_tokens(max(batches), max(contexts))
    # NOTE: the role processes run first, while this process holds nothing on the GPU: each side needs its
    # weights and the attention side its KV pool, which beside a colocated copy may not fit
    roles_steps, how = (_roles_decode_steps(spec, batches, contexts[0], new_tokens, longest, hf_config.vocab_size, say)
                        if roles else ({}, ""))
    model = build_random_model(hf_config, DTYPES[spec.model.dtype])
    gm = from_hf_model(captured, model, "cuda")
    engine = ColocatedEngine(gm, hf_config.num_hidden_layers, "cuda", max_batch=max(batches), max_seq_len=longest,
                             prefill_tokens=budget)
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
    gen = torch.Generator().manual_seed(0)
    engine.generate([[3, 4, 5]] * 2, 3)  # warm-up: kernels compiled, a graph captured
    for ctx in contexts:
        for b in batches:
            steps[(b, ctx)] = _engine_decode_step(engine.engine, b, ctx, new_tokens(b, ctx), hf_config.vocab_size, gen)
            say(f"decode   batch {b:>4} context {ctx:>5}: {steps[(b, ctx)] * 1e3:8.3f} ms")
    t_a = {key: (s - head_time(cost, key[0], side, eff) - n_moe * t_e(key[0])) / n_layers for key, s in steps.items()}
    k1, k2 = _fit(batches, [t_a[(b, contexts[0])] for b in batches])
    k1_ctx = max(0.0, sum((t_a[(b, contexts[1])] - t_a[(b, contexts[0])]) / (b * (contexts[1] - contexts[0]))
                          for b in batches) / len(batches))
    profile = Profile(gpu=torch.cuda.get_device_name(), model=f"{hf_config.model_type}:{n_layers}L",
                      context=float(contexts[0]), attention={"k1": k1, "k2": k2, "k1_ctx": k1_ctx},
                      expert={"k3": k3, "k4": k4, "experts": moe["num_experts"]}, tp=1)
    roles_rows = []
    if roles:
        ctx, measured = contexts[0], roles_steps
        link = over_nvlink(side)  # both roles on this GPU
        extra = [(measured[b] - steps[(b, ctx)]) / (2 * n_moe) - comm_time(cost, b, b, 1, link, link, eff)
                 for b in batches]
        profile.exchange = ExchangeFit(handoff_s=max(0.0, sorted(extra)[len(extra) // 2]), how=how)
        for b in batches:
            pred = disaggregated_step(cost, b, 1, 1, 1, ctx, link, link, eff, profile).total
            roles_rows.append({"batch": b, "context": ctx, "measured_s": measured[b], "predicted_s": pred,
                               "error": pred / measured[b] - 1, "colocated_measured_s": steps[(b, ctx)]})
    rows = []
    for (b, ctx), measured in steps.items():
        with_profile = colocated_step(cost, b, ctx, side, eff, profile)
        roofline = colocated_step(cost, b, ctx, side, eff)
        rows.append({"batch": b, "context": ctx, "measured_s": measured, "predicted_s": with_profile,
                     "error": with_profile / measured - 1, "roofline_s": roofline, "roofline_error": roofline / measured - 1})
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": __import__("triton").__version__,
            "transformers": __import__("transformers").__version__, "layers": n_layers, "dtype": spec.model.dtype}
    return ProfileReport(profile.model_dump(exclude_none=True), rows, expert_rows, meta, roles_rows)


def write_profile(report: ProfileReport, out: str | Path) -> Path:
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(report.profile, indent=1) + "\n")
    tmp.replace(out)
    side = out.with_name(out.stem + ".report.json")
    side.write_text(json.dumps({"meta": report.meta, "steps": report.rows, "experts": report.expert_rows,
                                "roles": report.roles_rows}, indent=1) + "\n")
    return out
