"""place_experts (issue 24): contiguous, balanced and replicated placements against independent computations
(brute force over assignments, the cut bound of the best possible split), the attention side's slot mapping,
and a model whose router sends most tokens to two of eight experts: recorded routing -> placements -> role
processes whose greedy tokens equal transformers' with replicas splitting the tokens."""
from __future__ import annotations

import itertools
import json

import pytest
import torch
from typer.testing import CliRunner

from msc.cli import app
from msc.errors import MscError
from msc.ir import graph_meta
from msc.ops import slot_tables
from msc.passes.place_experts import contiguous_bounds, place_balanced, place_contiguous, place_layer, place_replicated
from msc.plan import resolve_plan
from msc.spec import PlanSpec
from tests.passes.helpers import run_passes

@pytest.mark.parametrize("experts,nodes", [(4, 2), (8, 3), (5, 5), (7, 1)])
def test_contiguous_bounds_cover_every_expert_once_and_balance(experts, nodes):
    b = contiguous_bounds(experts, nodes)
    assert b[0] == 0 and b[-1] == experts and len(b) == nodes + 1
    sizes = [hi - lo for lo, hi in zip(b, b[1:])]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


def test_placement_recorded_per_layer(toy_gm):
    gm, _ = run_passes(toy_gm, ["annotate_roles", "split_roles", "place_experts"], nodes=3)
    table = graph_meta(gm)["placement"]
    assert table["num_nodes"] == 3 and table["bounds"] == {0: [0, 1, 2, 4], 1: [0, 1, 2, 4]}
    assert table["slots"] == {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]} and table["strategy"] == "contiguous"


def test_more_nodes_than_experts_is_an_error():
    with pytest.raises(MscError, match="plan.experts.nodes = 5 is more than the model's 4 experts"):
        resolve_plan(PlanSpec.model_validate({"experts": {"nodes": 5}}), 4)


def test_requires_split_first(toy_gm):
    with pytest.raises(MscError, match="needs pass 'split_roles'"):
        run_passes(toy_gm, ["annotate_roles", "place_experts"])


SKEWED = [900.0, 850.0, 40.0, 30.0, 60.0, 50.0, 40.0, 30.0]  # two hot experts of eight


def _brute_force_balanced(counts, nodes):
    """The best max/mean over every split of the experts into nodes of contiguous' sizes."""
    e = len(counts)
    size = e // nodes
    best = float("inf")

    def rec(left, loads):
        nonlocal best
        if not left:
            best = min(best, max(loads))
            return
        first, rest = left[0], left[1:]
        for others in itertools.combinations(rest, size - 1):
            group = (first, *others)
            rec([x for x in rest if x not in others], loads + [sum(counts[x] for x in group)])

    rec(list(range(e)), [])
    return best / (sum(counts) / nodes)


def test_balanced_keeps_the_expert_counts_and_beats_contiguous():
    for counts, nodes in ((SKEWED, 4), (SKEWED, 2), ([5, 1, 9, 3, 7, 2, 8, 4], 4)):
        p = place_balanced(counts, nodes)
        c = place_contiguous(len(counts), nodes)
        assert sorted(p.slots) == list(range(len(counts)))  # every expert once
        assert [len(p.node_slots(j)) for j in range(nodes)] == [len(c.node_slots(j)) for j in range(nodes)]
        best = _brute_force_balanced(counts, nodes)
        assert best - 1e-9 <= p.imbalance(counts) <= c.imbalance(counts)
        assert p.imbalance(counts) <= best * 4 / 3 + 1e-9  # LPT's guarantee
    # the skewed case: the two hot experts on different nodes
    p = place_balanced(SKEWED, 4)
    node_of = {e: j for j in range(4) for e in p.node_experts(j)}
    assert node_of[0] != node_of[1]


def test_replicated_splits_the_hot_experts_as_well_as_any_split_can():
    nodes = 4
    p = place_replicated(SKEWED, nodes, 1)
    assert len(p.slots) == len(SKEWED) + nodes and all(len(p.node_slots(j)) == 3 for j in range(nodes))
    for e, slots in p.copies().items():
        assert abs(sum(p.shares[s] for s in slots) - 1) < 1e-6  # an expert's pairs all go somewhere
        assert len({s // 3 for s in slots}) == len(slots)  # its copies on distinct nodes
    # the best split for these holders: max over node sets S of (pairs of experts held only inside S) / |S|
    holders = {e: {s // 3 for s in slots} for e, slots in p.copies().items()}
    bound = max(sum(SKEWED[e] for e, h in holders.items() if h <= set(sub)) / len(sub)
                for k in range(1, nodes + 1) for sub in itertools.combinations(range(nodes), k))
    assert max(p.node_loads(SKEWED)) == pytest.approx(bound, rel=1e-6)
    assert p.imbalance(SKEWED) <= 1.15 < place_balanced(SKEWED, nodes).imbalance(SKEWED)


def test_expert_slots_maps_each_pair_to_a_copy_in_its_share():
    p = place_replicated(SKEWED, 4, 1)
    slot_of, cum, copies = slot_tables(p.slots, p.shares, len(SKEWED))
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 8, (4000, 2), generator=g)
    slots = torch.ops.msc.expert_slots(idx, 1, slot_of, cum, copies)
    assert torch.equal(torch.tensor(p.slots)[slots], idx)  # every slot holds the pair's expert
    for e, ss in p.copies().items():
        got = torch.stack([(slots[idx == e] == s).float().mean() for s in ss])
        want = torch.tensor([p.shares[s] for s in ss])
        assert (got - want).abs().max() < 0.03, (e, got, want)


def test_strategies_without_a_profile_are_refused(tmp_path):
    from msc.compiler import compile_spec
    from msc.spec import parse_spec
    from tests.models.families import FAMILIES

    d = {"model": {"config": FAMILIES["mixtral"]}, "plan": {"experts": {"nodes": 2}},
         "passes": [{"name": "place_experts", "config": {"strategy": "balanced"}}]}
    with pytest.raises(MscError, match="needs a routing profile"):
        compile_spec(parse_spec(d), tmp_path / "b")
    with pytest.raises(MscError, match="counts 3 experts"):
        place_layer("balanced", [1, 2, 3], 4, 2, 1)


# ------------------------------------------------------------------ a model with a skewed router, end to end
PROMPTS = [[5, 17, 42, 100, 3], [7, 7, 9, 1], [1, 2, 3, 4, 5, 6, 200, 9], [30, 31], [8, 9, 10, 11, 12, 13]]


@pytest.fixture(scope="module")
def skewed_checkpoint(tmp_path_factory):
    """GPT-OSS (a router with a bias), 8 experts, the bias making experts 0 and 1 most tokens' top 2."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.models.families import FAMILIES

    c = dict(FAMILIES["gpt_oss"], num_local_experts=8)
    cfg = AutoConfig.for_model(c.pop("model_type"), **c)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.router.bias.zero_()
            layer.mlp.router.bias[:2] = 0.3  # most, not all, tokens pick experts 0 and 1
    path = tmp_path_factory.mktemp("skewed") / "ckpt"
    model.save_pretrained(path)
    return path, model


def _spec(path, strategy=None, routing=None, nodes=4):
    d = {"model": {"path": str(path)}, "plan": {"experts": {"nodes": nodes}, "batch_size": 5},
         "runtime": {"max_step_tokens": 9}}
    if strategy:
        d["passes"] = [{"name": "place_experts", "config": {"strategy": strategy, "routing": str(routing),
                                                             "replicas_per_node": 1}}]
    return d


def test_a_skewed_router_recorded_placed_and_run(skewed_checkpoint, tmp_path):
    from msc.compiler import compile_spec
    from msc.inspect import placement_report
    from msc.runtime.launcher import run_bundle
    from msc.spec import parse_spec
    from msc.verify import reference_generate

    path, hf = skewed_checkpoint
    plain = compile_spec(parse_spec(_spec(path)), tmp_path / "plain")
    routing = tmp_path / "routing.json"
    ids = [a for p in PROMPTS for a in ("--input-ids", ",".join(map(str, p)))]
    res = CliRunner().invoke(app, ["run", str(plain.path), "--colocated", "--device", "cpu", *ids,
                                   "--max-new-tokens", "6", "--record-routing", str(routing)])
    assert res.exit_code == 0, res.output
    counts = json.loads(routing.read_text())["layers"]
    for c in counts.values():
        assert (c[0] + c[1]) / sum(c) > 0.6  # the two hot experts take most pairs
    refs = [reference_generate(hf, p, 6) for p in PROMPTS]
    imbalance = {}
    for strategy in ("contiguous", "balanced", "replicated"):
        b = plain if strategy == "contiguous" else compile_spec(parse_spec(_spec(path, strategy, routing)), tmp_path / strategy)
        report = placement_report(b.path, routing)
        imbalance[strategy] = report["imbalance"]
        shown = CliRunner().invoke(app, ["inspect", str(b.path), "--json", "--routing", str(routing)])
        assert shown.exit_code == 0, shown.output
        placement = json.loads(shown.stdout)["placement"]
        assert placement["imbalance"] == pytest.approx(report["imbalance"]) and len(placement["nodes"]) == 4
        loads = [sum(n["expected_load"].values()) for n in placement["nodes"]]  # shares of every layer's pairs
        assert sum(loads) == pytest.approx(len(counts))
        again = tmp_path / f"routing_{strategy}.json"
        out = run_bundle(b.path, PROMPTS, 6, record_routing=again)
        assert out["outputs"] == refs, strategy
        # recorded at the replica's dispatch, slots counted as their experts: the colocated recording's counts
        assert json.loads(again.read_text())["layers"] == counts, strategy
    assert imbalance["replicated"] <= 1.15
    assert imbalance["balanced"] < imbalance["contiguous"]
