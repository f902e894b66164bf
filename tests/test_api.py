"""The Python API for custom models: a hand-written MoE marked with msc's decorators compiles, runs as
1 attention + 2 expert processes, and decodes exactly as the eager module does; bad marks are clear errors."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import msc
from msc.errors import MscError
from msc.runtime.launcher import run_bundle


def _load_example():
    path = Path(__file__).resolve().parents[1] / "examples" / "custom_moe.py"
    spec = importlib.util.spec_from_file_location("msc_example_custom_moe", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


ex = _load_example()


@pytest.fixture(scope="module")
def model():
    return ex.build_model(seed=0)


@pytest.fixture(scope="module")
def bundle(model, tmp_path_factory):
    """The example compiled from a plan dict: 2 expert nodes, 2 ping-pong micro-batches."""
    return msc.compile(model, {"experts": {"nodes": 2}, "microbatches": 2}, tmp_path_factory.mktemp("api") / "custom")


def test_compiled_custom_model_decodes_like_the_eager_module(model, bundle):
    res = run_bundle(bundle.path, ex.PROMPTS, 8, dump_logits=True)
    for prompt, ours, logits in zip(ex.PROMPTS, res["outputs"], res["logits"]):
        ref_tokens, ref_logits = ex.greedy(model, prompt, 8)  # full recompute per step, no KV cache
        assert ours == ref_tokens
        assert logits.shape == ref_logits.shape == (8, 128)
        assert (logits - ref_logits).abs().max().item() < 1e-4


def test_manifest_names_the_custom_class_and_the_checkpoint_is_the_modules_parameters(model, bundle):
    m = bundle.manifest
    assert m["model"]["model_type"] == "custom:TinyMoELM"
    assert m["model"]["python_class"].endswith(".TinyMoELM")
    assert {k: m["model"][k] for k in ("num_hidden_layers", "vocab_size", "num_experts", "top_k", "hidden_size",
                                       "intermediate_size", "dtype", "checkpoint", "eos_token_id")} == {
        "num_hidden_layers": 2, "vocab_size": 128, "num_experts": 4, "top_k": 2, "hidden_size": 32,
        "intermediate_size": 48, "dtype": "float32", "checkpoint": "checkpoint", "eos_token_id": None}
    assert [r["name"] for r in bundle.roles] == ["attention.0", "expert.0", "expert.1"]
    assert m["plan"]["microbatches"] == 2
    with safe_open(bundle.path / "checkpoint" / "model.safetensors", "pt") as f:
        assert set(f.keys()) == {n for n, _ in model.named_parameters()}
    with safe_open(bundle.path / "constants.safetensors", "pt") as f:
        assert set(f.keys()) == {"cos", "sin"}  # rotary tables: buffers, not checkpoint tensors
    # expert node 1 reads only rows 2..3 of each layer's experts; the attention side reads no expert weight
    exp1 = json.loads((bundle.path / "weights" / "expert.1.json").read_text())
    assert exp1["layers.1.moe.experts.gate_up"]["source"] == {"key": "layers.1.moe.experts.gate_up", "rows": [2, 4]}
    att = json.loads((bundle.path / "weights" / "attention.json").read_text())
    assert "layers.0.moe.router.weight" in att and not any(".experts." in k for k in att)


class NoExpertsLM(nn.Module):
    """Attention through msc.attention, but a dense MLP: nothing marked as experts."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 16)
        self.qkv = nn.Linear(16, 48, bias=False)
        self.mlp = nn.Linear(16, 16)
        self.head = nn.Linear(16, 64, bias=False)

    def forward(self, input_ids, position_ids):
        x = self.embed(input_ids)  # [1, T, 16]
        q, k, v = (t.view(1, -1, 2, 8).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))  # [1, 2, T, 8]
        x = x + msc.attention(q, k, v, layer=0).reshape(x.shape)
        return self.head(x + self.mlp(x))


def test_a_model_that_marks_no_experts_is_one_clear_error_and_writes_nothing(tmp_path):
    with pytest.raises(MscError, match=r"NoExpertsLM marks no experts: decorate .*@msc\.experts"):
        msc.compile(NoExpertsLM(), {"experts": {"nodes": 2}}, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_forward_must_take_input_ids_and_position_ids(tmp_path):
    class WrongSignature(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = ex.build_model()

        def forward(self, tokens):
            return self.inner(tokens, torch.arange(tokens.shape[1])[None])

    with pytest.raises(MscError, match=r"WrongSignature\.forward must take \(input_ids \[1, T\], position_ids \[1, T\]\).*takes \(tokens\)"):
        msc.compile(WrongSignature(), None, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_experts_whose_forward_computes_something_else_are_refused(tmp_path):
    @msc.experts(gate_up="gate_up", down="down")
    class GeluExperts(ex.Experts):
        def forward(self, hidden, top_k_index, top_k_weights):
            out = torch.zeros_like(hidden)
            for e in range(self.gate_up.shape[0]):
                w = (top_k_weights * (top_k_index == e)).sum(-1, keepdim=True)  # [T, 1]
                gate, up = F.linear(hidden, self.gate_up[e]).chunk(2, dim=-1)
                out = out + w * F.linear(F.gelu(gate) * up, self.down[e])
            return out

    model = ex.build_model()
    model.layers[1].moe.experts.__class__ = GeluExperts
    with pytest.raises(MscError, match=r"'layers\.1\.moe\.experts' \(GeluExperts\): its forward does not compute what msc::experts"):
        msc.compile(model, None, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_router_mark_checks_the_output_contract():
    @msc.router
    class HalfRouter(nn.Module):
        def forward(self, x):  # x [T, H]
            w, i = torch.softmax(x, dim=-1).topk(2, dim=-1)
            return w.half(), i

    with pytest.raises(MscError, match=r"router HalfRouter must return \(weights \[T, K\] float32, index \[T, K\] int64\).*float16"):
        HalfRouter()(torch.randn(3, 4))


@pytest.mark.parametrize("window", [-1, 3])
def test_eager_msc_attention_is_plain_causal_attention(window):
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, 6, 8, generator=g), torch.randn(1, 2, 6, 8, generator=g), torch.randn(1, 2, 6, 8, generator=g)
    out = msc.attention(q, k, v, layer=0, sliding_window=window)  # [1, T, nh, d]
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)  # [1, 4, T, d]
    scores = q @ kk.transpose(-1, -2) / 8**0.5  # [1, 4, T, T]
    i, j = torch.arange(6)[:, None], torch.arange(6)[None]
    keep = (j <= i) & ((j > i - window) if window > 0 else True)
    ref = (torch.softmax(scores.masked_fill(~keep, float("-inf")), -1) @ vv).transpose(1, 2)
    torch.testing.assert_close(out, ref)


def test_spec_dict_options_and_the_registration_form(tmp_path):
    """A spec dict with runtime options; experts marked per instance with msc.mark_experts; the module's
    own forward is back in place afterwards."""

    class PlainExperts(nn.Module):  # not decorated: marked per instance below
        def __init__(self, src):
            super().__init__()
            self.w_in, self.w_out = src.gate_up, src.down

        def forward(self, hidden, top_k_index, top_k_weights):
            return ex.Experts.forward(type("V", (), {"gate_up": self.w_in, "down": self.w_out})(), hidden, top_k_index, top_k_weights)

    model = ex.build_model()
    for layer in model.layers:
        layer.moe.experts = msc.mark_experts(PlainExperts(layer.moe.experts), gate_up="w_in", down="w_out")
    ids, pos = torch.tensor([[3, 9, 27]]), torch.arange(3)[None]
    before = model(ids, pos)
    b = msc.compile(model, {"plan": {"experts": {"nodes": 2}}, "runtime": {"transport": "tcp"}}, tmp_path / "b")
    assert b.manifest["spec"]["runtime"]["transport"] == "tcp"
    assert b.manifest["placement"] == {"0": [0, 2, 4], "1": [0, 2, 4]}
    assert all("forward" not in vars(layer.moe.experts) for layer in model.layers)
    torch.testing.assert_close(model(ids, pos), before, rtol=0, atol=0)
    with pytest.raises(MscError, match="leave the spec's 'model' key out"):
        msc.compile(model, {"model": {"config": {"model_type": "mixtral"}}}, tmp_path / "c")


def test_verify_refuses_a_custom_bundle_with_a_clear_message(bundle):
    from msc.verify import verify_bundle

    with pytest.raises(MscError, match="compiled from a custom module"):
        verify_bundle(bundle.path)
