"""Configs whose layers have their own shapes (transformers' `per_layer_config`: Gemma 4's global layers of
another head width, dots3's sliding-window MLA layers): refused at compile time naming the fields and layers
that differ (issue 26: never a program of the wrong widths); the pieces of Gemma 4 msc does read (its
activation under `hidden_activation`, its scaled embedding's buffer) are read as transformers computes them."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from msc.compiler import compile_spec
from msc.errors import MscError
from msc.models.survey import tiny_config
from msc.spec import parse_spec


def _compile(config: dict, out):
    return compile_spec(parse_spec({"model": {"config": config, "seed": 0}, "plan": {"experts": {"nodes": 2}}}), out)


def _hf_config(config: dict):
    from transformers import AutoConfig

    c = dict(config)
    return AutoConfig.for_model(c.pop("model_type"), **c)


@pytest.mark.parametrize("family, match", [
    ("gemma4_text", r"model\.config: layers of different shapes \(per_layer_config\) are not implemented: "
                    r"head_dim \(16 at layer 0, 32 at layer 1\)"),
    ("dots3_note_text", r"head_dim \(16 at layer 0, 24 at layers 2, 3\); kv_lora_rank \(16 at layer 0, 12 at layers 2, 3\)"),
    ("gemma4", r"model\.config\.text_config: layers of different shapes"),  # the composite: its text model's layers
])
def test_layers_of_their_own_widths_are_refused_naming_them(family, match, tmp_path):
    config = tiny_config(family)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_config(_hf_config(config))  # transformers builds it: the refusal is msc's
    assert sum(p.numel() for p in hf.parameters()) < 20_000_000
    with pytest.raises(MscError, match=match):
        _compile(config, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_per_layer_fields_with_one_value_read_as_global(tmp_path):
    """Gemma 4 with its global head width equal to the sliding one: every layer the same shape, so the config
    check passes; the compile goes on past the embedding (its buffer rebuilt) and the activation, and refuses the
    first piece msc does not implement by name (the layer's in-place scale) rather than computing something else."""
    config = {**tiny_config("gemma4_text"), "global_head_dim": 16}
    with pytest.raises(MscError, match=r"aten\.mul_\.Tensor"):
        _compile(config, tmp_path / "b")


def test_a_weighted_module_s_buffer_is_rebuilt_as_transformers_computes_it():
    """Gemma 4's scaled embedding holds its weight and a non-persistent scale: the scale is rebuilt on the CPU
    (the weight stays on meta) and equals the scale of transformers' own CPU model."""
    from transformers import AutoModelForCausalLM

    from msc.capture import _buffers_on_cpu, build_meta_model

    cfg = _hf_config({**tiny_config("gemma4_text"), "global_head_dim": 16})
    meta = build_meta_model(cfg, torch.float32)
    buffers = _buffers_on_cpu(meta)
    assert meta.model.embed_tokens.weight.is_meta
    cpu = AutoModelForCausalLM.from_config(cfg)
    want = cpu.model.embed_tokens.embed_scale
    assert float(want) == pytest.approx(64 ** 0.5)  # Gemma scales embeddings by sqrt(hidden_size)
    torch.testing.assert_close(buffers["model.embed_tokens.embed_scale"], want)


def test_a_buffer_the_initialiser_leaves_unset_is_refused():
    """A non-persistent buffer the model's _init_weights does not set would be uninitialised memory in the
    program: refused, naming the module and the buffer."""
    from msc.capture import _buffers_on_cpu, build_meta_model

    cfg = _hf_config(tiny_config("mixtral"))
    meta = build_meta_model(cfg, torch.float32)

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.empty(3, device="meta"), persistent=False)

    meta.model.layers[0].extra = Scaled()
    with pytest.raises(MscError, match=r"module 'model\.layers\.0\.extra' \(Scaled\): its buffer 'scale' is not set"):
        _buffers_on_cpu(meta)


def test_the_experts_activation_is_read_from_their_act_fn_when_the_config_names_it_otherwise():
    """Gemma 4's experts take their activation from `hidden_activation` (no hidden_act): the name comes from the
    module's act_fn class, and computes what that act_fn computes."""
    from msc.backends.compute.torch_eager import parse_activation
    from models.base import _act_fn_name

    cfg = _hf_config({**tiny_config("gemma4_text"), "global_head_dim": 16})
    from transformers import AutoModelForCausalLM

    experts = AutoModelForCausalLM.from_config(cfg).model.layers[0].experts
    assert getattr(cfg, "hidden_act", None) is None
    name = _act_fn_name(experts)
    assert name == "gelu_pytorch_tanh"
    x, up = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    torch.testing.assert_close(parse_activation(name)(x, up), experts.act_fn(x) * up)
