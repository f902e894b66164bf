"""models/hf_keys.py (`build_key_index`, `KeyIndex.source`) with transformers itself as the reference.

For each family a tiny random model is saved by transformers (`save_pretrained`, which writes the original
on-disk layout: per-expert `w1/w2/w3` or `gate_proj/up_proj/down_proj`, Mixtral's `block_sparse_moe`,
Ernie's `mlp.moe_statics`), the saved keys are read back with safetensors, and every in-memory parameter
that is not stored under its own name is rebuilt from the saved tensors by following the source the index
gives. It must equal the model's parameter exactly.

Source format: {"key": k} (optionally "rows": [a, b], rows a..b-1 of k), or {"stack": [[k1, k2, ...] per
expert]}: per expert the listed tensors concatenated along dim 0, experts stacked along a new dim 0.
"""
from __future__ import annotations

import re

import pytest
import torch
from safetensors import safe_open

from msc.errors import MscError
from msc.models.hf_keys import build_key_index
from tests.models.families import FAMILIES, GENERIC_FAMILIES

ALL = {**FAMILIES, **GENERIC_FAMILIES}
NAMES = ["mixtral", "phimoe", "ernie4_5_moe", "qwen2_moe"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (model_type, in-memory named parameters, saved tensors by checkpoint key)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = {}
    for name in NAMES:
        cfg = dict(ALL[name])
        model_type = cfg.pop("model_type")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg)).eval()
        with torch.no_grad():  # make every parameter distinct random data (norms start as ones, biases as zeros)
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, dtype=p.dtype))
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        tensors = {}
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
        out[name] = (model_type, {n: p.detach().clone() for n, p in model.named_parameters()}, tensors)
    return out


def assemble(src: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Rebuild a parameter from saved tensors following a source (the format in the module docstring)."""
    if "stack" in src:
        assert set(src) == {"stack"}, src
        return torch.stack([torch.cat([tensors[k] for k in group], dim=0) for group in src["stack"]], dim=0)
    assert set(src) <= {"key", "rows"}, src
    t = tensors[src["key"]]
    if "rows" in src:
        a, b = src["rows"]
        t = t[a:b]
    return t


def _keys_of(src: dict) -> list[str]:
    return [k for group in src["stack"] for k in group] if "stack" in src else [src["key"]]


def _expert_of(key: str) -> int:
    m = re.search(r"\.experts\.(\d+)\.", key)
    assert m is not None, key
    return int(m.group(1))


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_rebuilds_exactly(saved, name):
    model_type, params, tensors = saved[name]
    keys = set(tensors)
    index = build_key_index(model_type, keys)
    not_own = [p for p in params if p not in keys]
    assert any(p.endswith("experts.gate_up_proj") for p in not_own)  # the family does fuse on load
    used = set()
    for p in params:
        if p in keys:
            assert torch.equal(tensors[p], params[p]), p  # transformers saved it under its own name
            used.add(p)
            continue
        src = index.source(p, None)
        assert src is not None, f"no source for '{p}'"
        got = assemble(src, tensors)
        assert got.shape == params[p].shape, (p, got.shape, params[p].shape)
        assert torch.equal(got, params[p]), p
        used.update(_keys_of(src))
    # every saved tensor makes some parameter (tied lm_head aside)
    assert keys - used <= {"lm_head.weight"}, sorted(keys - used)


@pytest.mark.parametrize("name", NAMES)
def test_expert_rows_name_only_those_experts(saved, name):
    model_type, params, tensors = saved[name]
    keys = set(tensors)
    index = build_key_index(model_type, keys)
    fused = [p for p in params if p not in keys and p.split(".")[-1] in ("gate_up_proj", "down_proj")]
    assert fused
    for p in fused:
        src = index.source(p, (1, 3))
        assert "stack" in src and len(src["stack"]) == 2
        assert [{_expert_of(k) for k in group} for group in src["stack"]] == [{1}, {2}], src
        assert torch.equal(assemble(src, tensors), params[p][1:3]), p
    # a renamed (not fused) parameter with expert rows: those rows of its one tensor
    for p in (q for q in params if q in index.renamed):
        src = index.source(p, (1, 3))
        assert src["rows"] == [1, 3]
        assert torch.equal(assemble(src, tensors), params[p][1:3]), p


def test_unknown_parameter_has_no_source(saved):
    model_type, _, tensors = saved["mixtral"]
    index = build_key_index(model_type, set(tensors))
    assert index.source("model.layers.0.self_attn.q_proj.weight", None) is None  # stored under its own name
    assert index.source("model.layers.9.mlp.experts.gate_up_proj", None) is None


@pytest.mark.parametrize("name,drop", [
    ("mixtral", "model.layers.0.block_sparse_moe.experts.1.w3.weight"),
    ("qwen2_moe", "model.layers.2.mlp.experts.2.gate_proj.weight"),
    ("ernie4_5_moe", "model.layers.1.mlp.experts.0.up_proj.weight"),
])
def test_missing_expert_tensor_is_named(saved, name, drop):
    model_type, _, tensors = saved[name]
    keys = set(tensors) - {drop}
    index = build_key_index(model_type, keys)
    layer = re.search(r"layers\.(\d+)\.", drop).group(1)
    expert = _expert_of(drop)
    param = f"model.layers.{layer}.mlp.experts.gate_up_proj"
    with pytest.raises(MscError, match=rf"expert {expert} of '{re.escape(param)}'"):
        index.source(param, None)
    with pytest.raises(MscError, match=rf"expert {expert}"):
        index.source(param, (expert, expert + 1))
    # a node that does not hold that expert does not need the tensor
    other = (expert + 1, expert + 2)
    assert all(_expert_of(k) == expert + 1 for k in _keys_of(index.source(param, other)))
    # down_proj of that layer is complete
    assert len(index.source(f"model.layers.{layer}.mlp.experts.down_proj", None)["stack"]) == int(
        {"mixtral": 4, "qwen2_moe": 6, "ernie4_5_moe": 6}[name])


def test_missing_last_expert_is_named(saved):
    model_type, _, tensors = saved["mixtral"]
    drop = "model.layers.0.block_sparse_moe.experts.3.w2.weight"  # down_proj of expert 3 (of 4) has one tensor
    index = build_key_index(model_type, set(tensors) - {drop})
    with pytest.raises(MscError, match="expert 3"):
        index.source("model.layers.0.mlp.experts.down_proj", None, num_experts=4)


def test_a_split_conversion_reads_each_parameter_s_row_block():
    """Sarvam-MoE's checkpoint keeps a fused query_key_value that transformers splits on load, each part sized like
    the model's q, k and v projections: each parameter reads its own rows of the one tensor (it once failed with an
    IndexError, then was refused by name)."""
    from msc.models.hf_keys import build_key_index

    key = "model.layers.0.attention.query_key_value.weight"
    index = build_key_index("sarvam_moe", {key})
    sizes = {"q_proj": 64, "k_proj": 16, "v_proj": 16}
    index.rows_of = lambda name: sizes[name.split(".")[-2]]
    base = "model.layers.0.self_attn."  # (attention renamed self_attn by the family's mapping)
    assert index.split[base + "q_proj.weight"][0] == key
    got = {p: index.source(base + f"{p}.weight", None) for p in sizes}
    assert got == {"q_proj": {"key": key, "rows": [0, 64]}, "k_proj": {"key": key, "rows": [64, 80]},
                   "v_proj": {"key": key, "rows": [80, 96]}}
