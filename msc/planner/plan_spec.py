"""`msc plan`: a spec's model, hardware and workload -> ranked deployment plans, and the chosen one as a spec."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from msc.errors import MscError
from msc.planner.cost import ModelCost, cost_of_spec
from msc.planner.hardware import get_gpu, load_catalogue
from msc.planner.perf import Efficiency, load_profile
from msc.planner.search import Pinned, Planner, Pool, SearchResult, Workload, explain_infeasible


@dataclass
class PlanReport:
    planner: Planner
    result: SearchResult
    cost: ModelCost
    moe: dict
    seconds: dict  # capture / search


def planner_for(spec, cost: ModelCost, tp_sizes: tuple[int, ...] | None = None, pinned: bool = True) -> Planner:
    """The planner of a spec's hardware, workload and planner options; `pinned`: honour the fields its `plan:`
    sets (the search varies only the others)."""
    hw = spec.hardware
    if hw is None or (hw.pool is None and (hw.attention is None or hw.experts is None)):
        raise MscError("the spec has no hardware for the planner: give hardware.pool {gpu, count} (one pool for both "
                       "sides) or hardware.attention and hardware.experts (one pool each)")
    if hw.pool is not None and (hw.attention is not None or hw.experts is not None):
        raise MscError("hardware: give either pool, or attention and experts, not both")
    catalogue = load_catalogue(hw.catalogue, hw.overrides or None)
    opts = dict(spec.planner)
    objective = opts.pop("objective", "cost" if hw.pool is None else "gpu")
    if objective not in ("gpu", "cost"):
        raise MscError(f"planner.objective is '{objective}': expected 'gpu' (tokens/s per GPU) or 'cost' (per dollar)")
    profile = opts.pop("profile", None)
    routing_path = opts.pop("routing", None)
    placement = opts.pop("placement", "contiguous")
    replicas_per_node = opts.pop("replicas_per_node", 1)
    if placement not in ("contiguous", "balanced", "replicated"):
        raise MscError(f"planner.placement is '{placement}': expected contiguous, balanced or replicated (place_experts' strategies)")
    if placement != "contiguous" and not routing_path:
        raise MscError(f"planner.placement '{placement}' balances a routing profile: give planner.routing = FILE")
    max_m = int(opts.pop("max_microbatches", 8))
    try:
        eff = Efficiency.model_validate(opts)
    except ValidationError as e:
        first = e.errors()[0]
        raise MscError(f"planner.{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
    wl = Workload(spec.workload.input_len, spec.workload.output_len, spec.workload.tpot_ms / 1e3)

    def pool(p) -> Pool:
        return Pool(get_gpu(p.gpu, catalogue), p.count, p.per_node)

    att = pool(hw.pool if hw.pool is not None else hw.attention)
    exp = None if hw.pool is not None else pool(hw.experts)
    kw = {} if tp_sizes is None else {"tp_sizes": tp_sizes}
    prof = load_profile(profile) if profile else None
    if prof is not None:
        check_profile_gpu(prof, [att.gpu.name] + ([exp.gpu.name] if exp is not None else []), profile)
    pin = Pinned.of_spec(spec.plan) if pinned else Pinned()
    if tp_sizes is not None:  # a pinned tp joins a restricted set (fill_plan's tp = 1)
        kw["tp_sizes"] = tuple(sorted(set(tp_sizes) | {t for t in (pin.tp_a, pin.tp_e) if t is not None}))
    routing = None
    if routing_path:
        from msc.planner.routing import load_routing

        routing = load_routing(routing_path)
        routing.strategy, routing.replicas_per_node = placement, int(replicas_per_node)
    return Planner(cost, att, exp, wl, eff, prof, objective, max_m, pinned=pin, routing=routing, **kw)


def check_profile_gpu(prof, gpus: list[str], path) -> None:
    """A profile measured on one GPU type predicts nothing about another: refuse the mix."""
    norm = lambda name: "".join(c for c in name.lower() if c.isalnum())  # noqa: E731
    for gpu in gpus:
        if norm(gpu) not in norm(prof.gpu):
            raise MscError(f"planner.profile {path} was measured on '{prof.gpu}', but the plan uses {gpu}: profile that "
                           f"GPU (msc profile) or drop planner.profile to use the roofline model")


def plan_spec(spec, top: int = 10, progress=None) -> PlanReport:
    """Search the spec's plans. With no disaggregated plan but a colocated instance that serves the model (a
    one-GPU pool, say), the report holds no plans and that colocated answer; with neither, MscError naming
    the binding constraint."""
    t0 = time.perf_counter()
    cost, moe = cost_of_spec(spec)
    longest = moe.get("max_position_embeddings")
    wl = spec.workload
    if longest is not None and wl.input_len + wl.output_len > longest:
        raise MscError(f"workload: input_len + output_len = {wl.input_len + wl.output_len} tokens, longer than the "
                       f"model's max_position_embeddings ({longest})")
    t1 = time.perf_counter()
    planner = planner_for(spec, cost)
    result = planner.search(top=top, progress=progress)
    t2 = time.perf_counter()
    if not result.plans and result.colocated is None:
        raise MscError(explain_infeasible(result, planner))
    return PlanReport(planner, result, cost, moe, {"capture": t1 - t0, "search": t2 - t1})


def no_plan_note(report: PlanReport) -> str | None:
    """What the user should hear besides the table: no disaggregated plan (the colocated answer instead), or
    none that beats colocated. None when the best plan beats it."""
    res, colo = report.result, report.result.colocated
    if colo is None:
        return None
    how = (f"instances of {colo.gpus_per_instance} GPU{'s' if colo.gpus_per_instance > 1 else ''}, batch {colo.batch:,}, "
           f"TPOT {colo.step_s * 1e3:.1f} ms, {colo.per_gpu:,.0f} tok/s/GPU: serve it with `msc serve --colocated`")
    if not res.plans:
        why = explain_infeasible(res, report.planner).removeprefix("no plan meets the constraints: ")
        return f"no disaggregated plan fits ({why}); colocated: {how}"
    best = res.plans[0]
    if best.gain is not None and best.gain < 1.0:
        return (f"warning: no disaggregated plan beats colocated (the best, {best.describe()}, gives {best.gain:.2f}x "
                f"its {'tokens/s per $' if report.planner.objective == 'cost' else 'tokens/s per GPU'}); colocated: {how}")
    return None


def chosen_spec_dict(spec, report: PlanReport) -> dict:
    """The spec with the best plan's fields filled in (what `msc compile` takes)."""
    if not report.result.plans:
        raise MscError("no disaggregated plan to write: " + (no_plan_note(report) or "none was found"))
    best = report.result.plans[0]
    d = spec.model_dump(exclude_none=True)
    d["plan"] = {
        "attention": {"replicas": best.n_a, "tp": best.tp_a},
        "experts": {"nodes": best.n_e, "tp": best.tp_e},
        "microbatches": best.m,
        "batch_size": best.b_a * best.m,
    }
    return d


def write_chosen(spec, report: PlanReport, out: str | Path) -> Path:
    import yaml

    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("# written by `msc plan`: the best plan filled in\n" + yaml.safe_dump(chosen_spec_dict(spec, report), sort_keys=False))
    tmp.replace(out)
    return out


def fill_plan(spec, cost: ModelCost):
    """The spec's plan with every unset field taken from the best plan (what `msc compile` does when the
    spec names hardware). NOTE: searched with tp = 1 only, the one tensor-parallel size the runtime runs."""
    from msc.spec import PlanSpec

    planner = planner_for(spec, cost, tp_sizes=(1,))
    result = planner.search(top=1)
    if not result.plans:
        msg = explain_infeasible(result, planner)
        if result.colocated is not None:
            msg += (f"; the model fits colocated on {result.colocated.gpus_per_instance} GPU(s): compile without "
                    "hardware: and run it with --colocated")
        raise MscError(msg)
    best = result.plans[0]
    given = spec.plan.model_dump()
    planned = {"attention": {"replicas": best.n_a, "tp": best.tp_a}, "experts": {"nodes": best.n_e, "tp": best.tp_e},
               "microbatches": best.m, "batch_size": best.b_a * best.m}
    merged = {
        "attention": {k: given["attention"][k] if given["attention"][k] is not None else v for k, v in planned["attention"].items()},
        "experts": {k: given["experts"][k] if given["experts"][k] is not None else v for k, v in planned["experts"].items()},
        "microbatches": given["microbatches"] or planned["microbatches"],
        "batch_size": given["batch_size"] or planned["batch_size"],
    }
    return PlanSpec.model_validate(merged), best


def plan_timeline(report: PlanReport, out_png: str | Path, plan_index: int = 0) -> dict:
    """Simulate one decode step of a plan (per-layer times from the performance model) and draw its
    timeline; returns the simulator's summary (iteration time, idle fractions) next to the model's formula."""
    from msc.planner.perf import attention_layer_time, comm_time, expert_layer_time, head_time
    from msc.planner.simulator import simulate, to_trace
    from msc.trace_plot import plot_trace

    pl, p = report.planner, report.result.plans[plan_index]
    model, ctx = pl.model, pl.wl.mean_context
    att, exp = pl.sides(p.tp_a, p.tp_e, p.gpus)  # as the search costed them
    tokens = p.b_a * p.n_a
    t_a = [attention_layer_time(lc, p.b_a, ctx, att, pl.eff, model, pl.profile, disaggregated=True) for lc in model.layers]
    t_a[-1] += head_time(model, p.b_a, att, pl.eff)
    load = [pl.routing.load_factor(i, p.n_e) if pl.routing is not None else 1.0 for i in range(len(model.layers))]
    extra = pl.routing.extra_slots if pl.routing is not None else 0
    t_e = [expert_layer_time(lc, tokens, model.num_experts // p.n_e, exp, pl.eff, model, pl.profile, ld, extra)
           for lc, ld in zip(model.layers, load)]
    # NOTE: the simulator takes one t_c: the busiest layer's (equal to every layer's under uniform routing)
    t_c = max(comm_time(model, p.b_a, tokens, p.n_e, att, exp, pl.eff, ld, pl.profile) for ld in load)
    sim = simulate(len(model.layers), p.m, t_a, t_e, t_c, shared_link=True)  # the search's network model
    title = (f"{p.describe()}, batch {p.batch:,}: simulated step {sim.iteration_time * 1e3:.1f} ms "
             f"(model {p.step_s * 1e3:.1f} ms)")
    plot_trace(to_trace(sim), out_png, title=title)
    return {"iteration_s": sim.iteration_time, "model_step_s": p.step_s, "idle_attention": sim.idle_attention,
            "idle_expert": sim.idle_expert}
