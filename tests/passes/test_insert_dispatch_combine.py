import torch

from msc.ir import graph_meta
from msc.ops import is_op
from msc.runtime import context
from tests.passes.helpers import LoopbackPeers, run_expert_program, run_passes

PIPE = ["annotate_roles", "split_roles", "place_experts", "insert_dispatch_combine"]


def test_attention_side_gets_dispatch_combine_pairs_with_the_placement(toy_gm):
    gm, _ = run_passes(toy_gm, PIPE)
    att = graph_meta(gm)["roles"]["attention"]
    dispatches = [n for n in att.graph.nodes if is_op(n, "dispatch")]
    combines = [n for n in att.graph.nodes if is_op(n, "combine")]
    assert len(dispatches) == len(combines) == 2
    assert all(d.args[4] == [0, 2, 4] for d in dispatches)
    assert all(c.args[0] is d for c, d in zip(combines, dispatches))


def test_expert_side_receives_and_sends_per_layer_in_order(toy_gm):
    gm, _ = run_passes(toy_gm, PIPE)
    exp = graph_meta(gm)["roles"]["expert"]
    seq = [(n.target.__name__.split(".")[0], n.args[0] if is_op(n, "expert_recv") else n.args[-1])
           for n in exp.graph.nodes if is_op(n, "expert_recv") or is_op(n, "expert_send")]
    assert seq == [("expert_recv", 0), ("expert_send", 0), ("expert_recv", 1), ("expert_send", 1)]
    assert not [n for n in exp.graph.nodes if n.op == "placeholder"]


def test_attention_program_with_loopback_peers_equals_original(toy, toy_gm):
    x = torch.randn(7, 8)
    want = toy(x)
    gm, _ = run_passes(toy_gm, PIPE)
    att, exp = graph_meta(gm)["roles"]["attention"], graph_meta(gm)["roles"]["expert"]

    def layer_on_node(layer, xs, idx, w, node):
        lo, hi = [0, 2, 4][node], [0, 2, 4][node + 1]
        return torch.ops.msc.experts(xs, idx, w, toy.gate_up[layer][lo:hi], toy.down[layer][lo:hi], layer, lo)

    with context.use(LoopbackPeers(layer_on_node)):
        got = att(x)
    assert torch.allclose(got, want, atol=1e-5)
    # and the expert program itself runs: every layer received and answered
    sent = run_expert_program(exp, {l: (x, torch.zeros(7, 2, dtype=torch.long), torch.ones(7, 2)) for l in range(2)})
    assert sorted(sent) == [0, 1]
