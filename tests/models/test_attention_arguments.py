"""msc's attention implementation refuses what it does not apply (issue 26: never a silently wrong program):
an unknown attention argument with a value, or non-causal attention, is an error naming it at compile time."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from msc.errors import MscError
from models.base import _msc_attention


class _Attn(nn.Module):
    layer_idx = 3


Q = torch.zeros(1, 4, 2, 8)


@pytest.mark.parametrize("kwargs, match", [
    ({"position_bias": torch.zeros(1, 4, 2, 2)}, "position_bias"),
    ({"indices": torch.zeros(2, 1, dtype=torch.long)}, "indices"),
    ({"sinks": torch.zeros(4)}, "sinks"),  # sinks under another name than GPT-OSS's s_aux
    ({"is_causal": False}, "non-causal"),
    ({"softcap": 30.0}, "soft-capping"),
])
def test_arguments_it_does_not_apply_are_refused_by_name(kwargs, match):
    with pytest.raises(MscError, match=match):
        _msc_attention(_Attn(), Q, Q, Q, None, **kwargs)


def test_per_call_flags_and_empty_arguments_pass():
    """What every family threads through (transformers' TransformersKwargs), and unknown names left None, reach
    msc::attention with the module's layer, scaling and window."""
    from msc.runtime import context

    seen = {}

    class _Runtime:
        def attention(self, q, k, v, layer, scaling, window, sinks=None):
            seen.update(layer=layer, scaling=scaling, window=window)
            return q.new_zeros(1, q.shape[2], q.shape[1], v.shape[3])

    ok = {"position_ids": torch.zeros(1, 2, dtype=torch.long), "output_router_logits": False, "output_attentions": False,
          "is_causal": True, "cu_seq_lens_q": None, "position_bias": None}
    with context.use(_Runtime()):
        out, _ = _msc_attention(_Attn(), Q, Q, Q, None, scaling=0.5, sliding_window=7, **ok)
    assert out.shape == (1, 2, 4, 8) and seen == {"layer": 3, "scaling": 0.5, "window": 7}


@pytest.mark.skipif(importlib.util.find_spec("transformers.models.inkling") is None, reason="needs transformers' inkling")
def test_inkling_is_refused_at_compile_time_naming_an_unimplemented_piece(tmp_path):
    """Inkling's attention adds a relative-position bias (a keyword argument) and runs its keys and values
    through short convolutions over past tokens: it compiled and ran before, returning other tokens than
    transformers' with no message. The short convolutions are found first (before capture); the position bias
    is refused at capture when they are not there."""
    from msc.compiler import compile_spec
    from msc.spec import parse_spec

    cfg = dict(model_type="inkling_text", vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=16,
               sliding_window_size=16, d_rel=4, rel_extent=32, intermediate_size=128, moe_intermediate_size=32,
               n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, max_position_embeddings=256)
    with pytest.raises(MscError, match=r"model\.layers\.0\.self_attn\.\w+ \(InklingShortConvolution\) holds a depthwise"):
        compile_spec(parse_spec({"model": {"config": cfg, "dtype": "float32"}, "device": "cpu",
                                 "plan": {"experts": {"nodes": 2}}}), tmp_path / "b")
    assert not (tmp_path / "b").exists()  # nothing half-written


@pytest.mark.skipif(importlib.util.find_spec("transformers.models.lfm2_moe") is None, reason="needs transformers' lfm2_moe")
def test_layers_that_mix_tokens_without_attention_are_refused(tmp_path):
    """LFM2-MoE's short-convolution layers keep a state outside the attention call (the KV cache does not
    hold it): with its activation given, it would compile and decode wrongly after a few steps."""
    from msc.compiler import compile_spec
    from msc.spec import parse_spec

    cfg = dict(model_type="lfm2_moe", vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
               num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, num_dense_layers=1,
               num_experts_per_tok=2, num_experts=4, layer_types=["conv", "full_attention", "conv", "full_attention"],
               max_position_embeddings=256, hidden_act="silu")
    with pytest.raises(MscError, match=r"model\.layers\.0\.conv \(Lfm2MoeShortConv\) holds a depthwise convolution "
                                       r"\(model\.layers\.0\.conv\.conv\): a per-sequence state layer msc does not "
                                       r"implement \(and 1 more\)"):
        compile_spec(parse_spec({"model": {"config": cfg, "dtype": "float32"}, "device": "cpu",
                                 "plan": {"experts": {"nodes": 2}}}), tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_layers_with_differently_shaped_keys_are_refused():
    """MiMo-V2-Flash's sliding-window layers have other key/value head counts than its full ones: one paged cache
    cannot hold both, so the compile refuses it, naming the layers and their shapes."""
    from transformers import AutoConfig

    from msc.capture import capture
    from msc.errors import MscError
    from msc.models.registry import adapter_for
    from msc.models.survey import tiny_config

    c = tiny_config("mimo_v2_flash")
    mt = c.pop("model_type")
    cfg = AutoConfig.for_model(mt, **c)
    dv = cfg.v_head_dim  # the value width, as the survey's sizes set it
    with pytest.raises(MscError, match=rf"differently shaped keys and values \(layers \[0\]: \('kv', 2, 16, {dv}\); "
                                       rf"layers \[1\]: \('kv', 4, 16, {dv}\)"):
        capture(cfg, adapter_for(mt, cfg))
