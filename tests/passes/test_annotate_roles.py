import pytest
import torch
import torch.fx as fx

from msc.errors import MscError
from msc.ir import node_meta
from msc.ops import is_op
from tests.passes.helpers import run_passes


def test_experts_and_their_weights_are_expert_role_everything_else_attention(toy_gm):
    gm, _ = run_passes(toy_gm, ["annotate_roles"])
    for n in gm.graph.nodes:
        role = node_meta(n)["role"]
        if is_op(n, "experts") or (n.op == "get_attr" and ("gate_up" in n.target or "down" in n.target)):
            assert role == "expert", n.name
        else:
            assert role == "attention", n.name


def test_graph_without_experts_is_rejected():
    class Dense(torch.nn.Module):
        def forward(self, x):
            return x * 2

    with pytest.raises(MscError, match="no MoE layers"):
        run_passes(fx.symbolic_trace(Dense()), ["annotate_roles"])
