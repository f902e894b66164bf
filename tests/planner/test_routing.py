"""Routing skew in the planner (msc.planner.routing): the busiest expert node sets a layer's expert time."""
from __future__ import annotations

import json

import pytest

from msc.errors import MscError
from msc.planner.perf import Efficiency, colocated_step, disaggregated_step, expert_layer_time
from msc.planner.routing import RoutingProfile, busiest_share, load_routing
from msc.planner.search import Planner, Pool
from tests.planner.test_search import WL, _gpu, _model, _side

SKEW = [40, 40, 5, 5, 3, 3, 2, 2]  # two of eight experts take 80 % of the pairs


def test_busiest_contiguous_block():
    assert busiest_share([4, 3, 2, 1], 2) == pytest.approx(7 / 10)
    assert busiest_share([4, 3, 2, 1], 4) == pytest.approx(4 / 10)
    assert busiest_share([1] * 6, 4) == pytest.approx(2 / 6)  # whole experts: ceil(6 / 4) on the busiest
    assert RoutingProfile(experts=8, default=SKEW).load_factor(3, 8) == pytest.approx(0.4 * 8)
    assert RoutingProfile(experts=8, layers={2: SKEW}).load_factor(3, 8) == 1.0  # a layer it does not cover


def test_uniform_routing_predicts_what_no_profile_does():
    model, gpu = _model(), _gpu()
    plain = Planner(model, Pool(gpu, 16, 8), None, WL).search(top=5).plans
    uniform = Planner(model, Pool(gpu, 16, 8), None, WL, routing=RoutingProfile(experts=8, default=[7] * 8)).search(top=5).plans
    assert [p.key() for p in plain] == [p.key() for p in uniform]
    for a, b in zip(plain, uniform):
        assert a.step_s == pytest.approx(b.step_s, rel=1e-12)


@pytest.mark.parametrize("n_e", [1, 2, 4, 8])
def test_a_skewed_layer_costs_its_busiest_node(n_e):
    model, gpu, eff = _model(), _gpu(), Efficiency()
    skew = RoutingProfile(experts=8, default=SKEW)
    b_a, n_a, m, ctx = 2048, 2, 2, 650.0  # compute-bound experts: the skew shows in their time
    st = disaggregated_step(model, b_a, m, n_a, n_e, ctx, _side(gpu, 1), _side(gpu, 1), eff, routing=skew)
    tokens = b_a * n_a
    # independent: the busiest node's pairs, by hand from the counts
    size = 8 // n_e
    busiest = max(sum(SKEW[i:i + size]) for i in range(0, 8, size)) / sum(SKEW)
    want = 0.0
    for lc in model.layers:
        if not lc.moe:
            continue
        pairs = tokens * model.top_k * busiest
        hit = size  # every expert of the node is hit at 4,096 tokens x top-2
        flops, nbytes = pairs * lc.expert_flops_per_token, hit * lc.expert_weight_bytes
        want += max(flops / (gpu.flops * eff.flops), nbytes / (gpu.mem_bw * eff.bandwidth)) + eff.layer_overhead_s
    assert st.t_e == pytest.approx(want, rel=2e-3)
    uniform = disaggregated_step(model, b_a, m, n_a, n_e, ctx, _side(gpu, 1), _side(gpu, 1), eff)
    if n_e == 1:  # one node holding every expert has no busiest node
        assert st.t_e == pytest.approx(uniform.t_e, rel=1e-12)
    else:
        assert st.t_e > 1.5 * uniform.t_e


def test_colocated_skew_costs_the_busiest_gpu():
    model, gpu, eff = _model(), _gpu(), Efficiency()
    skew = RoutingProfile(experts=8, default=SKEW)
    side = _side(gpu, 8)
    assert colocated_step(model, 256, 650.0, side, eff, routing=skew) > colocated_step(model, 256, 650.0, side, eff)
    one = _side(gpu, 1)  # one GPU holds every expert: skew changes nothing
    assert colocated_step(model, 256, 650.0, one, eff, routing=skew) == pytest.approx(
        colocated_step(model, 256, 650.0, one, eff), rel=1e-12)


def test_expert_layer_time_scales_its_pairs_by_the_load():
    model, gpu, eff = _model(), _gpu(), Efficiency()
    lc = next(lc for lc in model.layers if lc.moe)
    big = 100_000  # compute-bound: time proportional to pairs
    t1 = expert_layer_time(lc, big, 1, _side(gpu, 1), eff, model) - eff.layer_overhead_s
    t3 = expert_layer_time(lc, big, 1, _side(gpu, 1), eff, model, load=3.0) - eff.layer_overhead_s
    assert t3 == pytest.approx(3 * t1, rel=1e-9)


@pytest.mark.parametrize("doc, match", [
    ({"experts": 8, "default": [1] * 7}, "7 counts for 8 experts"),
    ({"experts": 4, "default": [1] * 4}, "for 4 experts; the model has 8"),
    ({"experts": 8, "layers": {"1": [-1] + [1] * 7}}, "counts must be finite numbers >= 0"),
    ({"experts": 8, "default": [0] * 8}, "add up to a positive"),
    ({"experts": 8, "default": [1] * 8, "extra": 1}, "not valid: extra"),
    ({"experts": 8, "layers": {"99": [1] * 8}}, r"layers \[99\], but the model has 8"),
])
def test_bad_routing_profiles_are_one_clear_error(tmp_path, doc, match):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(MscError, match=match):
        Planner(_model(), Pool(_gpu(), 16, 8), None, WL, routing=load_routing(path))


def test_placement_strategies_in_the_planner():
    """planner.placement: the load factor is the placed node's (passes/place_experts), and replicas cost memory."""
    from msc.passes.place_experts import place_balanced, place_replicated
    from msc.planner.search import expert_memory

    prof = RoutingProfile(experts=8, default=SKEW)
    contiguous = prof.load_factor(1, 4)
    prof.strategy = "balanced"
    assert prof.load_factor(1, 4) == pytest.approx(place_balanced(SKEW, 4).imbalance(SKEW), rel=1e-12)
    assert prof.load_factor(1, 4) < contiguous
    prof.strategy, prof.replicas_per_node = "replicated", 1
    assert prof.load_factor(1, 4) == pytest.approx(place_replicated(SKEW, 4, 1).imbalance(SKEW), rel=1e-12)
    assert prof.load_factor(1, 4) <= 1.15
    model, gpu = _model(), _gpu()
    planner = Planner(model, Pool(gpu, 16, 8), None, WL, routing=prof)
    assert planner.extra_slots == 1
    assert expert_memory(model, 4, 1, 1) == pytest.approx(model.expert_weight_bytes() * (1 / 4 + 1 / 8), rel=1e-12)
    best = planner.search(top=1).plans[0]
    assert best.expert_mem_bytes == pytest.approx(expert_memory(model, best.n_e, best.tp_e, 1), rel=1e-12)


def test_a_replica_s_weights_are_read_at_decode_sizes():
    """A node holding E/n_e + R experts reads R more experts' weights: at a decode-size micro-batch (weights
    bound, every held expert hit) its layer time grows by R / (E/n_e) of the weight-read part; at a huge one
    (pairs bound) the extra reads hardly matter. The H100 measurement behind it: docs/placement.md."""
    from msc.planner.perf import _roofline

    model, gpu, eff = _model(), _gpu(), Efficiency()
    lc = next(lc for lc in model.layers if lc.moe)
    side = _side(gpu, 1)
    small, big = 64, 100_000
    base = expert_layer_time(lc, small, 2, side, eff, model)
    more = expert_layer_time(lc, small, 2, side, eff, model, extra_slots=1)
    # 64 tokens top-2 of 8 experts hit all 8 (to 1e-7): 2 then 3 experts' weights, a weights-bound roofline
    two, three = (_roofline(64 * model.top_k * 2 / 8 * lc.expert_flops_per_token, n * lc.expert_weight_bytes, side, eff)
                  for n in (2, 3))
    assert more - base == pytest.approx(three - two, rel=1e-6)
    assert three > two
    t_big = expert_layer_time(lc, big, 2, side, eff, model)
    assert expert_layer_time(lc, big, 2, side, eff, model, extra_slots=1) == pytest.approx(t_big, rel=0.02)
    prof = RoutingProfile(experts=8, default=SKEW)
    prof.strategy, prof.replicas_per_node = "replicated", 1
    # the planner's step charges each layer's busiest node its copies' weights too
    st = disaggregated_step(model, 8, 1, 1, 4, 650.0, side, side, eff, routing=prof)
    want = sum(expert_layer_time(lc, 8, 2, side, eff, model, None, prof.load_factor(i, 4), extra_slots=1)
               for i, lc in enumerate(model.layers))
    assert st.t_e == pytest.approx(want, rel=1e-12)
    assert want > sum(expert_layer_time(lc, 8, 2, side, eff, model, None, prof.load_factor(i, 4))
                      for i, lc in enumerate(model.layers))
