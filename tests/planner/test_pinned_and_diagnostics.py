"""Pinned plan fields (the search varies only the others) and the planner's diagnostics (issue 22): each
checked against an independent computation (brute force over the configurations, scalar step calls)."""
from __future__ import annotations

import math

import pytest

from msc.errors import MscError
from msc.planner.search import Pinned, Planner, Pool, Workload, explain_infeasible
from tests.planner.test_search import WL, _gpu, _model


def _planner(pinned=None, count=16, per_node=8, wl=WL, gpu=None, **kw):
    return Planner(_model(), Pool(gpu or _gpu(), count, per_node), None, wl, pinned=pinned, **kw)


def test_a_fully_pinned_plan_predicts_what_the_search_reports_for_it():
    best = _planner().search(top=1).plans[0]
    pin = Pinned(best.tp_a, best.n_a, best.tp_e, best.n_e, best.m)
    res = _planner(pin).search()
    assert len(res.plans) == 1
    p = res.plans[0]
    assert p.key() == best.key() and p.step_s == best.step_s and p.binding == best.binding  # the batch still searched
    # with the batch pinned too: the same prediction, evaluated at that batch
    res = _planner(Pinned(best.tp_a, best.n_a, best.tp_e, best.n_e, best.m, best.b_a * best.m)).search()
    assert res.plans[0].key() == best.key() and res.plans[0].step_s == best.step_s
    assert res.plans[0].binding == "pinned batch"


@pytest.mark.parametrize("pin", [Pinned(m=2), Pinned(n_e=4), Pinned(tp_a=2, m=3), Pinned(n_a=2, n_e=8)])
def test_partly_pinned_plans_vary_only_the_other_fields(pin):
    free = _planner().search(top=0).plans
    pinned = _planner(pin).search(top=0).plans
    assert pinned
    fields = {"tp_a": pin.tp_a, "n_a": pin.n_a, "tp_e": pin.tp_e, "n_e": pin.n_e, "m": pin.m}
    want = {k: v for k, v in fields.items() if v is not None}
    assert all(getattr(p, k) == v for p in pinned for k, v in want.items())
    # the pinned search's plans are exactly the free search's plans with those fields
    same = sorted(p.key() for p in free if all(getattr(p, k) == v for k, v in want.items()))
    assert sorted(p.key() for p in pinned) == same


def test_a_pinned_batch_over_the_target_is_evaluated_and_says_so():
    roomy = _gpu(mem_gib=400)  # the latency target binds, not memory
    best = _planner(gpu=roomy).search(top=1).plans[0]
    assert best.binding == "latency (TPOT)"
    big = Pinned(best.tp_a, best.n_a, best.tp_e, best.n_e, best.m, (best.b_a + 50) * best.m)
    p = _planner(big, gpu=roomy).search().plans[0]
    assert p.b_a == best.b_a + 50 and p.step_s > WL.tpot_s
    assert p.binding == "pinned batch, over the TPOT target"


@pytest.mark.parametrize("pin, match", [
    (Pinned(n_e=3), "does not divide the model's 8 experts"),
    (Pinned(tp_a=16), "plan.attention.tp is 16"),
    (Pinned(tp_e=4), "more GPUs than a node"),
    (Pinned(m=3, batch=10), "not a multiple of plan.microbatches"),
    (Pinned(m=9), "plan.microbatches is 9"),
])
def test_pinned_fields_the_search_cannot_honour_are_errors(pin, match):
    with pytest.raises(MscError, match=match):
        _planner(pin, per_node=2)


def test_an_impossible_tpot_reports_the_true_fastest_configuration_and_no_memory_clause():
    # small memory: many configurations are rejected for memory, the rest for latency
    planner = _planner(wl=Workload(tpot_s=1e-4), gpu=_gpu(mem_gib=40))
    res = planner.search()
    assert not res.plans and res.rejected.get("latency")
    msg = explain_infeasible(res, planner)
    # independent: every configuration that fits in memory, stepped one by one at one sequence a micro-batch
    fits = [c for c in planner.configurations() if planner.best_for(*c, rejected={}) is None
            and _fits_memory(planner, c)]
    fastest = min(planner.step(*c, 1).total for c in fits)
    assert f"takes {fastest * 1e3:.1f} ms a token" in msg
    assert "GiB" not in msg


def _fits_memory(planner, cfg):
    rej: dict = {}
    planner.best_for(*cfg, rejected=rej)
    return "attention memory" not in rej and "expert memory" not in rej


def test_a_one_gpu_pool_gets_the_colocated_answer():
    planner = _planner(count=1)
    res = planner.search()
    assert not res.plans and res.colocated is not None and res.colocated.gpus_per_instance == 1
    assert "disaggregation needs at least one attention and one expert GPU" in explain_infeasible(res, planner)


def test_the_colocated_baseline_says_memory_when_memory_is_why():
    planner = _planner(gpu=_gpu(mem_gib=1), count=2)
    assert planner.colocated() is None and planner.colocated_reason == "memory"
    planner = _planner(wl=Workload(tpot_s=1e-4))
    assert planner.colocated() is None and planner.colocated_reason == "latency"


def test_tc_over_tf_is_reported_per_plan():
    for p in _planner().search(top=5).plans:
        assert p.tc_over_tf == pytest.approx(p.t_c / max(p.t_a, p.t_e))
        assert math.isfinite(p.tc_over_tf)


@pytest.mark.parametrize("experts,g", [(8, 2), (6, 4), (8, 16)])
def test_colocated_step_has_two_all_reduces_a_layer_and_whole_experts_per_gpu(experts, g):
    from msc.planner.perf import Efficiency, colocated_step, expected_experts_hit
    from tests.planner.test_search import _side

    model, gpu, eff, b, ctx = _model(experts=experts), _gpu(), Efficiency(), 64, 650.0
    side = _side(gpu, g)
    act = b * model.hidden_size * model.dtype_bytes
    allreduce = 0.0 if g == 1 else 2.0 * act * (g - 1) / g / gpu.nvlink_bw + 5e-6
    total = max(b * model.other_flops_per_token / (g * gpu.flops * eff.flops),
                model.other_weight_bytes / (g * gpu.mem_bw * eff.bandwidth))
    for lc in model.layers:
        pos = ctx
        flops = b * (lc.attn_flops_per_token + lc.core_flops_per_token_ctx * pos)
        nbytes = lc.attn_weight_bytes + b * pos * lc.kv_bytes_per_token
        total += max(flops / (g * gpu.flops * eff.flops), nbytes / (g * gpu.mem_bw * eff.bandwidth))
        total += eff.layer_overhead_s + 2 * allreduce  # after attention, after the MoE block: no more
        if lc.moe:
            busiest = -(-experts // g)  # whole experts on the busiest GPU
            hit = expected_experts_hit(experts, b, model.top_k)
            e_flops = b * model.top_k * lc.expert_flops_per_token * busiest / experts
            e_bytes = hit * lc.expert_weight_bytes * busiest / experts
            total += max(e_flops / (gpu.flops * eff.flops), e_bytes / (gpu.mem_bw * eff.bandwidth)) + eff.layer_overhead_s
    assert colocated_step(model, b, ctx, side, eff) == pytest.approx(total, rel=1e-12)


def test_a_colocated_instance_across_nodes_all_reduces_over_the_nic():
    one_node = _planner(count=16, per_node=16).colocated(batch=64)
    two_nodes = _planner(count=16, per_node=8).colocated(batch=64)
    # the best size may differ; at 16 GPUs the NIC (slower than NVLink here) makes the step longer
    from msc.planner.perf import Efficiency, Side, colocated_step

    gpu, m = _gpu(), _model()
    nvlink = colocated_step(m, 64, 650.0, Side(gpu.flops, gpu.mem_bw, gpu.nic_bw, gpu.nvlink_bw, 16), Efficiency())
    nic = colocated_step(m, 64, 650.0, Side(gpu.flops, gpu.mem_bw, gpu.nic_bw, gpu.nic_bw, 16), Efficiency())
    assert nic > nvlink
    assert one_node is not None and two_nodes is not None
    assert one_node.per_gpu >= two_nodes.per_gpu
    # the planner's instance of 16 GPUs: NVLink within one node of 16, each GPU's NIC across two nodes of 8
    assert _planner(count=16, per_node=16).colocated_side(16).nvlink_bw == gpu.nvlink_bw
    assert _planner(count=16, per_node=8).colocated_side(16).nvlink_bw == gpu.nic_bw
    assert _planner(count=16, per_node=8).colocated_side(8).nvlink_bw == gpu.nvlink_bw


def test_kv_heads_replicated_beyond_tp_cost_memory_and_bandwidth():
    """tp above the KV heads replicates them (as passes/shard_tensor_parallel.py compiles it): each GPU holds
    one head's cache, not 1/tp of it."""
    from dataclasses import replace

    from msc.planner.cost import ModelCost
    from msc.planner.perf import Efficiency, attention_layer_time
    from msc.planner.search import attention_memory
    from tests.planner.test_search import _side

    base = _model(kv_heads=2)
    known = ModelCost([replace(lc, kv_heads=2) for lc in base.layers], top_k=base.top_k, hidden_size=base.hidden_size,
                      dtype_bytes=base.dtype_bytes, other_weight_bytes=base.other_weight_bytes,
                      other_flops_per_token=base.other_flops_per_token)
    for tp in (1, 2):  # up to the heads: unchanged
        assert attention_memory(known, 16, 2, tp, WL) == attention_memory(base, 16, 2, tp, WL)
    # tp 8 over 2 heads: each GPU holds a whole head, i.e. half the cache (independent arithmetic)
    kv_total = 16 * 2 * WL.max_context * sum(lc.kv_bytes_per_token for lc in base.layers)
    extra = kv_total / 2 - kv_total / 8
    assert attention_memory(known, 16, 2, 8, WL) == pytest.approx(attention_memory(base, 16, 2, 8, WL) + extra)
    lc, gpu, eff = known.layers[1], _gpu(), Efficiency()
    slow = attention_layer_time(lc, 256, 4096.0, _side(gpu, 8), eff, known)
    fast = attention_layer_time(base.layers[1], 256, 4096.0, _side(gpu, 8), eff, base)
    assert slow > fast  # each rank reads a whole head's KV
