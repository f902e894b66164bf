"""Load-time fusions (msc/fusions.py): transformers' RMSNorm and the residual add before it become
msc::rms_norm / msc::add_rms_norm in every program of a bundle; on a CPU the fused ops run the same aten ops,
so logits are bit-for-bit those of the unfused program; MSC_FUSE=0 keeps the program as stored."""
from __future__ import annotations

import pytest
import torch

from msc.compiler import compile_spec
from msc.fusions import fuse_rms_norms, fuse_sibling_linears
from msc.runtime.launcher import run_bundle
from msc.spec import parse_spec
from tests.models.families import FAMILIES, GENERIC_FAMILIES

PROMPTS = [[5, 17, 42, 8], [7, 7, 9]]


def _bundle(name, tmp_path, **plan):
    d = {"model": {"config": {**FAMILIES, **GENERIC_FAMILIES}[name], "seed": 0, "dtype": "float32"},
         "plan": {"experts": {"nodes": 2}, **plan}}
    return compile_spec(parse_spec(d), tmp_path / name)


def _targets(graph):
    return [n.target for n in graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("name, layers, per_layer_norms", [("mixtral", 2, 0), ("qwen3_moe", 2, 2)])
def test_every_rms_norm_is_fused(tmp_path, monkeypatch, name, layers, per_layer_norms):
    """Mixtral: the first layer's input norm alone (its input is the embedding), then every norm after a residual
    add (post-attention, next input, final) with its add; Qwen3-MoE adds its per-head q/k norms (no add)."""
    bundle = _bundle(name, tmp_path)
    monkeypatch.setenv("MSC_FUSE", "0")
    plain = bundle.program_graph(bundle.manifest["colocated"]["program"])
    assert not any("rms_norm" in str(t) for t in _targets(plain))
    n_rsqrt = sum(t is torch.ops.aten.rsqrt.default for t in _targets(plain))
    monkeypatch.delenv("MSC_FUSE")
    counts = fuse_rms_norms(plain)
    assert counts == {"rms_norm": 1 + per_layer_norms * layers, "add_rms_norm": 2 * layers}
    assert sum(counts.values()) == n_rsqrt  # every norm of the model, and nothing else
    assert torch.ops.aten.rsqrt.default not in _targets(plain)
    plain.lint()  # still in order (the weights fetched before their first use)


@pytest.mark.parametrize("name, plan", [("mixtral", {}), ("deepseek_v3", {"microbatches": 2}), ("qwen3_moe", {})])
def test_fused_programs_give_the_unfused_logits(tmp_path, name, plan):
    """Role processes (micro-batch stages included): the fused programs' tokens equal the unfused ones and their
    per-step logits agree to float32 run-to-run noise. NOTE: not bit for bit across processes: two runs of the
    same unfused program already differ by ~1e-7 here (the CPU's reductions depend on buffer alignment); the
    op-level test below is exact."""
    bundle = _bundle(name, tmp_path, **plan)
    fused = run_bundle(bundle.path, PROMPTS, 4, dump_logits=True)
    plain = run_bundle(bundle.path, PROMPTS, 4, dump_logits=True, env={"MSC_FUSE": "0"})
    assert fused["outputs"] == plain["outputs"]
    for a, b in zip(fused["logits"], plain["logits"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_ops_compute_the_unfused_chain_exactly_on_a_cpu(dtype):
    """msc::rms_norm / msc::add_rms_norm on CPU tensors against transformers' RMSNorm module on the same tensors."""
    from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm

    g = torch.Generator().manual_seed(0)
    x, res = (torch.randn(6, 32, generator=g) * 2).to(dtype), torch.randn(6, 32, generator=g).to(dtype)
    norm = MixtralRMSNorm(32, eps=1e-6).to(dtype)
    norm.weight.data = (1 + 0.1 * torch.randn(32, generator=g)).to(dtype)
    with torch.no_grad():
        assert torch.equal(torch.ops.msc.rms_norm(x, norm.weight, 1e-6, dtype), norm(x))
        out, total = torch.ops.msc.add_rms_norm(x, res, norm.weight, 1e-6, dtype)
        assert torch.equal(total, x + res) and torch.equal(out, norm(x + res))


def test_a_norm_written_otherwise_is_left_alone():
    """Gemma's (1 + weight) form, or a norm without the float32 cast, is not the matched chain: unchanged."""
    import torch.fx as fx

    class GemmaLike(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(8))

        def forward(self, x):
            xf = x.float()
            y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
            return y.to(x.dtype) * (1.0 + self.weight)

    gm = torch.export.export(GemmaLike(), (torch.randn(2, 8),)).module()
    gm = fx.GraphModule(gm, gm.graph)
    assert fuse_rms_norms(gm) == {"rms_norm": 0, "add_rms_norm": 0}


@pytest.mark.parametrize("name, rotary_per_layer", [("mixtral", 2), ("qwen3_moe", 2), ("gpt_oss", 0)])
def test_rotary_is_fused_and_the_program_computes_the_same_logits(tmp_path, monkeypatch, name, rotary_per_layer):
    """transformers' rotate_half rotary of q and of k becomes msc::rotary (GPT-OSS rotates its halves in another
    chain: left alone); on a CPU the fused colocated program's logits are bit for bit the stored program's."""
    bundle = _bundle(name, tmp_path)
    layers = bundle.manifest["model"]["num_hidden_layers"]
    prog = bundle.manifest["colocated"]["program"]
    fused = bundle.load_program(prog)
    monkeypatch.setenv("MSC_FUSE", "0")
    plain = bundle.load_program(prog)
    rotary = sum(t is torch.ops.msc.rotary.default for t in _targets(fused.graph))
    assert rotary == rotary_per_layer * layers
    assert not any(t is torch.ops.msc.rotary.default for t in _targets(plain.graph))
    from msc.engine.build import build_engine
    from msc.engine.request import SamplingParams

    runs = []
    for gm in (fused, plain):
        eng = build_engine(bundle.manifest, gm, "cpu", keep_logits=True)
        runs.append(eng.generate(PROMPTS, SamplingParams(max_tokens=4)))
    for a, b in zip(*runs):
        assert a.output == b.output
        assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))


def _generate(bundle, gm, new=4):
    from msc.engine.build import build_engine
    from msc.engine.request import SamplingParams

    return build_engine(bundle.manifest, gm, "cpu", keep_logits=True).generate(PROMPTS, SamplingParams(max_tokens=new))


@pytest.mark.parametrize("name", sorted({**FAMILIES, **GENERIC_FAMILIES}))
def test_sibling_linears_fused_give_the_same_tokens(tmp_path, name):
    """Linears reading one input (q / k / v, a shared expert's gate / up, DeepSeek's q_a / kv_a) as one linear
    over concatenated weights, split after (what loading does on a GPU): every family's colocated program
    gives the unfused program's tokens and its logits to float32 rounding (one product instead of several)."""
    bundle = _bundle(name, tmp_path)
    prog = bundle.manifest["colocated"]["program"]
    plain, fused = bundle.load_program(prog), bundle.load_program(prog)
    counts = fuse_sibling_linears(fused)
    lins = lambda gm: sum(t is torch.ops.aten.linear.default for t in _targets(gm.graph))  # noqa: E731
    assert lins(fused) == lins(plain) - counts["linears"] + counts["linear_groups"]
    assert counts["linear_groups"] >= (0 if name == "dbrx" else 1)  # DBRX's q, k, v are one linear already
    held = lambda gm: sum(t.numel() for t in gm.state_dict().values())  # noqa: E731
    assert held(fused) == held(plain)  # the originals were dropped
    for a, b in zip(_generate(bundle, fused), _generate(bundle, plain)):
        assert a.output == b.output
        for x, y in zip(a.logits, b.logits):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_sibling_linears_fused_in_role_processes(tmp_path):
    """The role programs (micro-batch stages too) load with the fusion and give the unfused tokens."""
    bundle = _bundle("deepseek_v3", tmp_path, microbatches=2)
    fused = run_bundle(bundle.path, PROMPTS, 4, env={"MSC_FUSE_LINEARS": "1"})
    plain = run_bundle(bundle.path, PROMPTS, 4, env={"MSC_FUSE_LINEARS": "0"})
    assert fused["outputs"] == plain["outputs"]
