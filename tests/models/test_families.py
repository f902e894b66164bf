"""Every named family, and families with no adapter of their own, against the Hugging Face forward.

Each tiny config is compiled with 2 expert nodes and run as separate role processes: greedy tokens over
8 steps equal transformers' `generate`, and msc's logits are within 1e-4 of the model's own forward on
the same tokens (float32). The split itself is checked independently of the compiler: each expert node
runs one experts op per MoE layer of the Hugging Face model, the attention role none, and each expert
node's weight map reads only its half of every layer's experts.
"""
from __future__ import annotations

import json

import pytest
import torch

from msc.bundle import Bundle
from msc.compiler import compile_spec
from msc.errors import MscError
from msc.inspect import role_layers, role_table
from msc.models.generic import GenericAdapter
from msc.models.registry import adapter_for
from msc.spec import parse_spec
from msc.verify import verify_bundle
from tests.models.families import FAMILIES, GENERIC_FAMILIES

NODES = 2


def _spec(config: dict):
    return parse_spec({"model": {"config": config, "seed": 0, "dtype": "float32"}, "device": "cpu",
                       "plan": {"experts": {"nodes": NODES}}})


def _hf_expert_layers(checkpoint_dir) -> tuple[list[int], int, int]:
    """(layer indices holding an `experts` module, experts per layer, number of checkpoint values
    (parameters and persistent buffers)), read from the HF model itself."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(checkpoint_dir)))
    layers, counts = [], set()
    for name, mod in model.named_modules():
        if name.endswith(".experts") and not name.endswith("shared_experts"):
            layers.append(next(int(p) for p in name.split(".") if p.isdigit()))
            counts.add(next(t.shape[0] for t in mod.parameters()) if not hasattr(mod, "num_experts") else mod.num_experts)
    assert len(counts) == 1
    params = dict(model.named_parameters(remove_duplicate=False))
    persistent_buffers = [t for k, t in model.state_dict().items() if k not in params]
    n_values = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in persistent_buffers)  # tied counted once
    return layers, counts.pop(), n_values


def _check_split(bundle: Bundle) -> None:
    layers, n_experts, n_params = _hf_expert_layers(bundle.checkpoint_dir())
    assert layers, "the HF model has no experts modules"
    # what `msc inspect` reports: the captured graph holds every parameter, and the roles split them
    rows, manifest = role_table(bundle.path)
    assert manifest["captured"]["parameters"] == n_params
    assert rows[0]["parameters"] + sum(r["parameters"] for r in rows[1:]) == n_params
    assert manifest["model"]["num_moe_layers"] == len(layers)
    expert_layers = [r["layer"] for r in role_layers(bundle.path, "expert.0")]
    assert expert_layers == [str(i) for i in layers]
    programs = bundle.path / "programs"
    assert "msc.experts" not in (programs / "attention.py").read_text()
    per_node = n_experts // NODES
    for j in range(NODES):
        code = (programs / f"expert.{j}.py").read_text()
        assert code.count("msc.experts.default(") == len(layers)
        weights = json.loads((bundle.path / "weights" / f"expert.{j}.json").read_text())
        mine = list(range(j * per_node, (j + 1) * per_node))
        for param, entry in weights.items():
            assert "experts" in param, f"expert.{j} reads a non-expert parameter {param}"
            assert entry["shape"][0] == per_node
            assert _experts_read(entry["source"], entry["shape"]) == mine, (param, entry["source"])


def _experts_read(src: dict, shape: list[int]) -> list[int]:
    """Which experts a weight source reads, worked out from the checkpoint key names and row ranges."""
    if "stack" in src:
        out = []
        for part in src["stack"]:
            ids = set()
            for item in part:
                if isinstance(item, str):  # ...experts.E.<name>.weight
                    ids.add(int(item.split(".experts.")[1].split(".")[0]))
                else:  # rows of a flattened [E*I, H] tensor (DBRX)
                    lo, hi = item["rows"]
                    ids.add(lo // (hi - lo))
            assert len(ids) == 1
            out.append(ids.pop())
        return out
    lo, hi = src["rows"]  # a fused [E, ...] tensor read by rows
    return list(range(lo, hi))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_named_family_matches_hf(tmp_path, family):
    bundle = compile_spec(_spec(FAMILIES[family]), tmp_path / family)
    assert bundle.manifest["model"]["model_type"] == family
    _check_split(bundle)
    r = verify_bundle(bundle.path, None, 8)
    assert r["outputs"] == r["reference_outputs"]
    assert all(len(o) == 8 for o in r["outputs"])
    assert r["max_abs_logit_err"] < 1e-4


@pytest.mark.parametrize("family", sorted(GENERIC_FAMILIES))
def test_family_without_adapter_goes_through_the_generic_one(tmp_path, family):
    from transformers import AutoConfig

    config = GENERIC_FAMILIES[family]
    assert type(adapter_for(family, AutoConfig.for_model(family))) is GenericAdapter
    bundle = compile_spec(_spec(config), tmp_path / family)
    _check_split(bundle)
    r = verify_bundle(bundle.path, None, 8)
    assert r["outputs"] == r["reference_outputs"]
    assert r["max_abs_logit_err"] < 1e-4


@pytest.mark.parametrize("family, config, expected", [
    ("jetmoe", {}, r"model\.layers\.0\.self_attention\.experts \(JetMoeMoA\) does not use transformers' experts interface"),
    ("hy_v4", {}, r"model\.layers\.\d+\.self_attn\.indexer \(HYV4Indexer\) selects the tokens its attention sees"),
    ("deepseek_v4", {}, r"model\.layers\.0\.mlp\.experts \(DeepseekV4Experts\) computes its own gate activation"),
])
def test_unsupported_family_names_the_module_and_the_reason(tmp_path, family, config, expected):
    # the family's default (full-size) config on the meta device: nothing is materialised
    spec = parse_spec({"model": {"config": {"model_type": family, "num_hidden_layers": 2, **config}}, "device": "meta",
                       "plan": {"experts": {"nodes": NODES}}})
    out = tmp_path / "b"
    with pytest.raises(MscError, match=expected):
        compile_spec(spec, out)
    assert not out.exists()
