import pytest

from msc.errors import MscError
from msc.ir import graph_meta
from msc.passes.place_experts import contiguous_bounds
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


def test_more_nodes_than_experts_is_an_error():
    with pytest.raises(MscError, match="plan.experts.nodes = 5 is more than the model's 4 experts"):
        resolve_plan(PlanSpec.model_validate({"experts": {"nodes": 5}}), 4)


def test_requires_split_first(toy_gm):
    with pytest.raises(MscError, match="needs pass 'split_roles'"):
        run_passes(toy_gm, ["annotate_roles", "place_experts"])
