"""The cost model read off captured graphs, against the model configs and the HF models' own parameters."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from msc.capture import capture
from msc.models.registry import adapter_for
from msc.planner.cost import model_cost
from tests.models.families import FAMILIES, GENERIC_FAMILIES, RUNNING_STATE_FAMILIES


def _cost(family: str):
    c = dict(FAMILIES[family])
    model_type = c.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **c)
    adapter = adapter_for(model_type, cfg)
    cap = capture(cfg, adapter)
    return model_cost(cap.gm, adapter.moe_shape(cfg)["top_k"], set(cap.constants)), cfg


def _hf_bytes(cfg) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = [t for k, t in model.state_dict().items() if k not in params]
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(b.numel() * b.element_size() for b in buffers)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss", "qwen2_moe"])
def test_weights_split_into_sides_add_up_to_the_hf_model(family):
    cost, cfg = _cost(family)
    assert cost.attention_weight_bytes() + cost.expert_weight_bytes() == _hf_bytes(cfg)


def test_mixtral_costs_match_the_architecture():
    cost, cfg = _cost("mixtral")
    h, i, e, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = h // nh
    assert cost.top_k == k and cost.num_experts == e and len(cost.layers) == cfg.num_hidden_layers
    for lc in cost.layers:
        proj = h * nh * d + 2 * h * nkv * d + nh * d * h  # q, k, v, o
        assert lc.attn_flops_per_token == 2 * (proj + e * h)  # + the router
        assert lc.core_flops_per_token_ctx == 2 * nh * 2 * d  # QKᵀ and PV
        assert lc.kv_bytes_per_token == nkv * 2 * d * 4  # float32
        assert lc.expert_flops_per_token == 2 * 3 * h * i and lc.expert_weight_bytes == 3 * h * i * 4
        assert lc.window == -1
    assert cost.other_flops_per_token == 2 * cfg.vocab_size * h  # the head


def test_deepseek_mla_dense_layer_and_gpt_oss_windows():
    cost, cfg = _cost("deepseek_v3")
    assert [lc.moe for lc in cost.layers] == [False, True, True]  # first_k_dense_replace = 1
    # the latent cache: kv_lora_rank + qk_rope_head_dim values a token (float32), one head for all
    assert cost.layers[1].kv_bytes_per_token == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    assert cost.layers[1].kv_heads == 1
    nh, r, dr = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    assert cost.layers[1].core_flops_per_token_ctx == 2 * nh * (2 * r + dr)  # W_k absorbed: scores over r + dr, values r
    assert cost.layers[1].experts == cfg.n_routed_experts
    # the dense layer's MLP replaces the MoE layer's router and shared experts on the attention side
    h = cfg.hidden_size
    dense_mlp, router, shared = 3 * h * cfg.intermediate_size, cfg.n_routed_experts * h, 3 * h * cfg.moe_intermediate_size * cfg.n_shared_experts
    assert cost.layers[0].attn_flops_per_token - cost.layers[1].attn_flops_per_token == 2 * (dense_mlp - router - shared)
    cost, cfg = _cost("gpt_oss")
    assert [lc.window for lc in cost.layers] == [cfg.sliding_window, -1]


def _same_numbers(a, b, rel=1e-9) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_numbers(a[k], b[k], rel) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_same_numbers(x, y, rel) for x, y in zip(a, b))
    return a == pytest.approx(b, rel=rel, abs=0)


_ALL = {**FAMILIES, **GENERIC_FAMILIES, **RUNNING_STATE_FAMILIES}


@pytest.mark.parametrize("family,deeper", [(f, True) for f in sorted(_ALL)] + [("mixtral", False), ("gpt_oss", False), ("phimoe", False)])
def test_the_planners_capture_gives_the_costs_of_the_compiled_graph(family, deeper):
    """`msc plan` reads its costs off the graph of one layer per kind traced at a fixed token count
    (capture_layer_kinds); `msc compile` off the full graph `capture` gives. The costs must be the same.
    deeper: more layers; else the tiny configs (two layers: both traced where they differ in kind, one
    where they do not)."""
    from msc.capture import capture_layer_kinds
    from msc.planner.cost import model_cost_of_kinds
    from tests.test_layer_template import _deeper

    c = _deeper(_ALL[family]) if deeper else dict(_ALL[family])
    model_type = c.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **c)
    adapter = adapter_for(model_type, cfg)
    top_k = adapter.moe_shape(cfg)["top_k"]
    kinds = capture_layer_kinds(cfg, adapter)
    if kinds.rep_of is not None:  # each representative stands for itself; deeper models leave layers out
        assert all(kinds.rep_of[r] == r for r in set(kinds.rep_of.values()))
        assert len(set(kinds.rep_of.values())) < len(kinds.rep_of) or not deeper
    else:
        assert not deeper
    cap = capture(cfg, adapter)
    want = model_cost(cap.gm, top_k, set(cap.constants)).to_dict()
    got = model_cost_of_kinds(kinds, top_k).to_dict()
    assert len(got["layers"]) == cfg.num_hidden_layers
    assert _same_numbers(got, want), (got, want)
