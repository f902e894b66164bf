import torch

from msc.ir import get_attr_targets, graph_meta
from msc.ops import is_op
from tests.passes.helpers import run_passes


def test_split_cuts_each_experts_call_and_keeps_weights_on_one_side(toy_gm):
    gm, _ = run_passes(toy_gm, ["annotate_roles", "split_roles"])
    att, exp = graph_meta(gm)["roles"]["attention"], graph_meta(gm)["roles"]["expert"]
    assert sum(is_op(n, "remote_experts") for n in att.graph.nodes) == 2
    assert not any(is_op(n, "experts") for n in att.graph.nodes)
    assert sum(is_op(n, "experts") for n in exp.graph.nodes) == 2
    assert set(get_attr_targets(exp.graph)) == {"gate_up.0", "down.0", "gate_up.1", "down.1"}
    assert not set(get_attr_targets(att.graph)) & set(get_attr_targets(exp.graph))
    assert [n.name for n in exp.graph.nodes if n.op == "placeholder"] == [
        "hidden_0", "index_0", "weights_0", "hidden_1", "index_1", "weights_1"]


def test_expert_program_computes_what_the_original_experts_calls_did(toy, toy_gm):
    gm, _ = run_passes(toy_gm, ["annotate_roles", "split_roles"])
    exp = graph_meta(gm)["roles"]["expert"]
    x = torch.randn(6, 8)
    ins = []
    for layer in range(2):
        w, i = torch.ops.msc.router(x, toy.gate[layer], 2, layer)
        ins += [x, i, w]
    outs = exp(*ins)
    for layer in range(2):
        w, i = ins[3 * layer + 2], ins[3 * layer + 1]
        ref = torch.ops.msc.experts(x, i, w, toy.gate_up[layer], toy.down[layer], layer, 0)
        assert torch.equal(outs[layer], ref)
