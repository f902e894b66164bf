"""Plan search against brute force, and every returned plan re-checked independently."""
from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest

from msc.errors import MscError
from msc.planner.cost import LayerCost, ModelCost
from msc.planner.perf import Efficiency, Side, disaggregated_step, pipeline_total
from msc.planner.perf import attention_layer_time, comm_time, expert_layer_time, head_time
from msc.planner.search import Planner, Pool, Workload


def _gpu(name="G", tflops=300, bw=2000, mem_gib=80, nic_gbps=200, nvlink=300, price=2.0):
    return SimpleNamespace(name=name, flops=tflops * 1e12, mem_bw=bw * 1e9, mem_bytes=mem_gib * 2**30,
                           nic_bw=nic_gbps * 1e9 / 8, nvlink_bw=nvlink * 1e9, price_per_hour=price)


def _model(layers=8, dense_first=1, experts=8, top_k=2, hidden=4096, inter=8192, kv_heads=8, head_dim=128, heads=32):
    """A mid-size MoE: per-layer costs written from the architecture (not from the code under test)."""
    b = 2  # bf16
    attn_params = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2 + experts * hidden
    out = []
    for i in range(layers):
        dense = i < dense_first
        lc = LayerCost(
            layer=i,
            attn_weight_bytes=(attn_params + (3 * hidden * inter if dense else 0)) * b,
            attn_flops_per_token=2.0 * (attn_params + (3 * hidden * inter if dense else 0)),
            core_flops_per_token_ctx=2.0 * heads * 2 * head_dim,
            kv_bytes_per_token=kv_heads * 2 * head_dim * b,
            experts=0 if dense else experts,
            expert_weight_bytes=0 if dense else 3 * hidden * inter * b,
            expert_flops_per_token=0.0 if dense else 2.0 * 3 * hidden * inter,
        )
        out.append(lc)
    return ModelCost(out, top_k=top_k, hidden_size=hidden, dtype_bytes=b,
                     other_weight_bytes=2 * 32000 * hidden * b, other_flops_per_token=2.0 * 32000 * hidden)


WL = Workload(input_len=571, output_len=159, tpot_s=0.05)


def _side(gpu, tp):
    return Side(gpu.flops, gpu.mem_bw, gpu.nic_bw, gpu.nvlink_bw, tp)


def _step_by_layer(model, gpu_a, gpu_e, tp_a, n_a, tp_e, n_e, m, b_a, eff, ctx, in_node=False):
    """The decode step from per-layer lists and the reference's formula (independent of the grouped code);
    in_node: the exchange over NVLink (a plan inside one node of one pool)."""
    att, exp = _side(gpu_a, tp_a), _side(gpu_e, tp_e)
    if in_node:
        att = Side(att.flops, att.mem_bw, gpu_a.nvlink_bw, att.nvlink_bw, tp_a)
        exp = Side(exp.flops, exp.mem_bw, gpu_e.nvlink_bw, exp.nvlink_bw, tp_e)
    t_a = [attention_layer_time(lc, b_a, ctx, att, eff, model, disaggregated=True) for lc in model.layers]
    t_a[-1] += head_time(model, b_a, att, eff)
    t_e = [expert_layer_time(lc, b_a * n_a, model.num_experts // n_e, exp, eff, model) for lc in model.layers]
    t_c = [comm_time(model, b_a, b_a * n_a, n_e, att, exp, eff) if lc.moe else 0.0 for lc in model.layers]
    return pipeline_total(t_a, t_e, t_c, m)


def _attention_bytes_per_gpu(model, b_a, m, tp_a):
    weights = sum(lc.attn_weight_bytes for lc in model.layers) + model.other_weight_bytes
    kv = m * b_a * (WL.input_len + WL.output_len) * sum(lc.kv_bytes_per_token for lc in model.layers)
    act = m * b_a * model.hidden_size * model.dtype_bytes * 16
    return (weights + kv + act) / tp_a


def test_grouped_step_equals_the_per_layer_formula():
    model, gpu, eff = _model(layers=6, dense_first=2), _gpu(), Efficiency()
    for tp_a, n_a, tp_e, n_e, m, b in [(1, 2, 1, 4, 3, 16), (2, 1, 4, 8, 1, 1), (4, 3, 2, 2, 4, 200)]:
        got = disaggregated_step(model, b, m, n_a, n_e, WL.mean_context, _side(gpu, tp_a), _side(gpu, tp_e), eff).total
        want = _step_by_layer(model, gpu, gpu, tp_a, n_a, tp_e, n_e, m, b, eff, WL.mean_context)
        assert got == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("hetero", [False, True])
def test_search_finds_the_brute_force_optimum(hetero):
    model = _model(layers=4)
    if hetero:
        att_pool, exp_pool = Pool(_gpu("A", bw=4000, tflops=150, mem_gib=96, price=1.5), 4, 4), Pool(_gpu("E", bw=860, tflops=360, mem_gib=48, price=1.0), 4, 4)
    else:
        att_pool, exp_pool = Pool(_gpu(), 8, 4), None
    planner = Planner(model, att_pool, exp_pool, WL, max_microbatches=4, objective="cost" if hetero else "gpu")
    result = planner.search(top=0)
    assert result.plans
    best = result.plans[0]

    # brute force: every configuration and every batch up to memory, no binary search
    eff, gpu_a = Efficiency(), att_pool.gpu
    gpu_e = (exp_pool or att_pool).gpu
    usable_a, usable_e = gpu_a.mem_bytes * eff.memory_fraction, gpu_e.mem_bytes * eff.memory_fraction
    expert_bytes = sum(lc.expert_weight_bytes * lc.experts for lc in model.layers)
    scores = {}
    for tp_a, tp_e, n_e, m in itertools.product((1, 2, 4), (1, 2, 4), (1, 2, 4, 8), range(1, 5)):
        for n_a in range(1, 9):
            if hetero and (tp_a * n_a > att_pool.count or tp_e * n_e > exp_pool.count):
                continue
            if not hetero and tp_a * n_a + tp_e * n_e > att_pool.count:
                continue
            if expert_bytes / n_e / tp_e > usable_e:
                continue
            for b in range(1, 4096):
                if _attention_bytes_per_gpu(model, b, m, tp_a) > usable_a:
                    break
                in_node = not hetero and tp_a * n_a + tp_e * n_e <= att_pool.per_node
                t = _step_by_layer(model, gpu_a, gpu_e, tp_a, n_a, tp_e, n_e, m, b, eff, WL.mean_context, in_node)
                if t > WL.tpot_s:
                    continue
                gpus = tp_a * n_a + tp_e * n_e
                cost = tp_a * n_a * gpu_a.price_per_hour + tp_e * n_e * gpu_e.price_per_hour
                tput = b * m * n_a / t
                scores[(tp_a, n_a, tp_e, n_e, m, b)] = (tput / cost if hetero else tput / gpus, -gpus)
    brute = max(scores, key=lambda k: scores[k])
    assert scores[best.key()][0] == pytest.approx(scores[brute][0], rel=1e-9)
    assert best.key() == brute or scores[best.key()] == scores[brute]


def test_every_plan_meets_its_latency_and_memory_limits():
    model, gpu = _model(layers=6), _gpu(mem_gib=40)
    planner = Planner(model, Pool(gpu, 16, 8), None, WL)
    result = planner.search(top=30)
    assert len(result.plans) > 5
    eff = Efficiency()
    expert_bytes = sum(lc.expert_weight_bytes * lc.experts for lc in model.layers)
    for p in result.plans:
        in_node = p.gpus <= 8  # one node of the pool: the exchange over NVLink
        t = _step_by_layer(model, gpu, gpu, p.tp_a, p.n_a, p.tp_e, p.n_e, p.m, p.b_a, eff, WL.mean_context, in_node)
        assert t <= WL.tpot_s * (1 + 1e-12)
        assert p.step_s == pytest.approx(t, rel=1e-12)
        assert _attention_bytes_per_gpu(model, p.b_a, p.m, p.tp_a) <= gpu.mem_bytes * eff.memory_fraction
        assert expert_bytes / p.n_e / p.tp_e <= gpu.mem_bytes * eff.memory_fraction
        assert p.tp_a * p.n_a + p.tp_e * p.n_e <= 16
        # the batch is the largest that fits: one more sequence per micro-batch breaks a limit
        over_t = _step_by_layer(model, gpu, gpu, p.tp_a, p.n_a, p.tp_e, p.n_e, p.m, p.b_a + 1, eff, WL.mean_context,
                                in_node)
        over_mem = _attention_bytes_per_gpu(model, p.b_a + 1, p.m, p.tp_a) > gpu.mem_bytes * eff.memory_fraction
        assert over_t > WL.tpot_s or over_mem
    scores = [p.per_gpu for p in result.plans]
    assert scores == sorted(scores, reverse=True)
    assert result.colocated is not None and all(p.gain == pytest.approx(p.per_gpu / result.colocated.per_gpu) for p in result.plans)


def test_impossible_targets_say_which_constraint_failed():
    from msc.planner.search import explain_infeasible

    planner = Planner(_model(layers=4), Pool(_gpu(mem_gib=80), 8, 8), None, Workload(tpot_s=1e-5))
    result = planner.search()
    assert not result.plans
    msg = explain_infeasible(result, planner)
    assert "TPOT target" in msg and "even with one sequence per micro-batch" in msg

    tiny_gpu = _gpu(mem_gib=0.5)
    planner = Planner(_model(layers=4), Pool(tiny_gpu, 2, 2), None, WL)
    result = planner.search()
    assert not result.plans
    assert "GiB" in explain_infeasible(result, planner)


def test_pool_without_gpus_is_refused():
    with pytest.raises(MscError, match="at least 1"):
        Planner(_model(), Pool(_gpu(), 0, 8), None, WL)


def test_a_measured_profile_replaces_the_roofline(tmp_path):
    """With a profile, per-layer times are the paper's linear fits, whatever the GPU figures say."""
    import json

    from msc.planner.perf import load_profile

    prof = {"format": 1, "gpu": "G", "context": 600.0,
            "attention": {"k1": 2e-6, "k2": 1e-4, "k1_ctx": 1e-9}, "expert": {"k3": 5e-7, "k4": 2e-4}}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(prof))
    profile = load_profile(path)
    model, eff, gpu = _model(layers=3, dense_first=1), Efficiency(), _gpu()
    b_a, n_a, n_e, m, ctx = 10, 2, 4, 2, 650.0
    st = disaggregated_step(model, b_a, m, n_a, n_e, ctx, _side(gpu, 1), _side(gpu, 1), eff, profile)
    t_a = 2e-6 * b_a + 1e-4 + 1e-9 * b_a * (ctx - 600.0)
    pairs = b_a * n_a * model.top_k * (model.num_experts // n_e) / model.num_experts  # (token, expert) pairs per node
    t_e = 5e-7 * pairs + 2e-4
    head = head_time(model, b_a, _side(gpu, 1), eff)
    assert st.t_a == pytest.approx(3 * t_a + head)
    assert st.t_e == pytest.approx(2 * t_e)  # the dense first layer has no expert side

    path.write_text(json.dumps({**prof, "attention": {"k1": -1, "k2": 0}}))
    with pytest.raises(MscError, match="not a valid msc profile"):
        load_profile(path)


@pytest.mark.parametrize("case", ["one pool", "two pools", "profile", "small memory"])
def test_search_over_arrays_equals_best_for_of_each_configuration(case):
    """search() evaluates all configurations at once; every plan, rejection and step count must be what
    best_for gives one configuration at a time, bit for bit (the same batches tried, the same arithmetic)."""
    from dataclasses import asdict

    from msc.planner.perf import ExpertFit, LinearFit, Profile

    model, exp_pool, profile = _model(layers=5, dense_first=1), None, None
    att_pool = Pool(_gpu(mem_gib=24), 16, 8)  # some plans bound by latency, some by memory
    if case == "two pools":  # with some configurations too slow even at one sequence
        att_pool, exp_pool = Pool(_gpu("A", bw=4000, tflops=150, mem_gib=24, price=1.5), 8, 4), Pool(_gpu("E", bw=860, tflops=360, mem_gib=48, price=1.0), 8, 4)
    elif case == "profile":
        profile = Profile(gpu="G", context=600.0, attention=LinearFit(k1=2e-6, k2=1e-4, k1_ctx=1e-9),
                          expert=ExpertFit(k3=5e-7, k4=2e-4, experts=8))
    elif case == "small memory":  # experts that do not fit few nodes, attention that does not fit tp = 1
        att_pool = Pool(_gpu(mem_gib=1), 16, 8)
    wl = Workload(input_len=571, output_len=159, tpot_s=0.03)
    planner = Planner(model, att_pool, exp_pool, wl, profile=profile, max_microbatches=4)
    configs = list(planner.configurations())
    want_rejected: dict = {}
    want = [p for cfg in configs if (p := planner.best_for(*cfg, rejected=want_rejected)) is not None]
    want_evaluated, planner.evaluated = planner.evaluated, 0
    got_rejected: dict = {}
    got = planner.best_for_all(configs, got_rejected)
    assert [asdict(p) for p in got] == [asdict(p) for p in want]
    assert got_rejected == want_rejected and planner.evaluated == want_evaluated
    assert want
    if case == "small memory":
        assert want_rejected.get("expert memory") and want_rejected.get("attention memory")
    else:
        assert {p.binding for p in want} == {"latency (TPOT)", "memory (KV cache)"}
    if case == "two pools":
        assert want_rejected.get("latency")
