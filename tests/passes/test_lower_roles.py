import torch

from msc.ir import graph_meta
from msc.ops import is_op
from tests.passes.helpers import run_expert_program, run_passes

PIPE = ["annotate_roles", "split_roles", "place_experts", "insert_dispatch_combine", "lower_roles"]


def test_one_program_per_expert_node_with_its_rows_only(toy_gm):
    gm, _ = run_passes(toy_gm, PIPE, nodes=3)
    progs = graph_meta(gm)["programs"]
    assert sorted(progs) == ["attention", "expert.0", "expert.1", "expert.2"]
    assert progs["expert.1"].weights["gate_up.0"] == {"key": "gate_up.0", "rows": [1, 2]}
    assert progs["expert.2"].shapes["down.1"] == [2, 8, 16]
    assert not any("gate_up" in t for t in progs["attention"].weights)
    firsts = [[n.args[6] for n in progs[f"expert.{j}"].gm.graph.nodes if is_op(n, "experts")] for j in range(3)]
    assert firsts == [[0, 0], [1, 1], [2, 2]]


def test_expert_programs_partial_outputs_sum_to_the_full_layer(toy, toy_gm):
    gm, _ = run_passes(toy_gm, PIPE, nodes=2)
    progs = graph_meta(gm)["programs"]
    x = torch.randn(5, 8)
    inputs = {}
    for layer in range(2):
        w, i = torch.ops.msc.router(x, toy.gate[layer], 2, layer)
        inputs[layer] = (x, i, w)
    total = {l: torch.zeros_like(x) for l in range(2)}
    for j in range(2):
        prog = progs[f"expert.{j}"]
        # the lowered program holds full tensors at compile time; give it its own rows as the runtime would
        lo, hi = (0, 2) if j == 0 else (2, 4)
        for target in prog.weights:
            layer_t = dict(toy.named_parameters())[target]
            parent, _, leaf = target.rpartition(".")
            setattr(prog.gm.get_submodule(parent), leaf, torch.nn.Parameter(layer_t[lo:hi].detach()))
        for l, y in run_expert_program(prog.gm, inputs).items():
            total[l] += y
    for layer in range(2):
        x_, i, w = inputs[layer]
        ref = torch.ops.msc.experts(x_, i, w, toy.gate_up[layer], toy.down[layer], layer, 0)
        assert torch.allclose(total[layer], ref, atol=1e-6)
