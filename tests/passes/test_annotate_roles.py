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


def test_shared_experts_and_dense_layers_follow_the_attention_rule():
    """DeepSeek-V3 (tiny): the shared experts and the dense first layer's MLP run on the attention side."""
    from transformers import AutoConfig

    from msc.capture import capture
    from msc.models.registry import adapter_for
    from tests.models.families import FAMILIES

    c = dict(FAMILIES["deepseek_v3"])
    model_type = c.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **c)
    gm = capture(cfg, adapter_for(model_type, cfg)).gm
    gm, _ = run_passes(gm, [{"name": "annotate_roles", "config": {"shared_experts": "attention"}}])
    roles = {n.target: node_meta(n)["role"] for n in gm.graph.nodes if n.op == "get_attr"}
    shared = [t for t in roles if ".shared_experts." in t or t.startswith("model.layers.0.mlp.")]
    assert shared and all(roles[t] == "attention" for t in shared)
    assert {roles[t] for t in roles if ".mlp.experts." in t} == {"expert"}


def test_unknown_shared_experts_rule_is_refused():
    from msc.pass_manager import PassManager

    with pytest.raises(MscError, match=r"annotate_roles.*shared_experts"):
        PassManager.from_entries([{"name": "annotate_roles", "config": {"shared_experts": "expert"}}])
