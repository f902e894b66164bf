"""Shared fixtures: the tiny Mixtral (as a transformers model and as a compiled bundle), toy MoE graphs."""
from __future__ import annotations

import os

import pytest
import torch

# NOTE: with no GPU, msc's Triton kernels run through Triton's interpreter (numpy on the CPU), so CI checks
# them at tiny sizes. Triton reads this when a kernel is decorated, so it is set before any msc kernel import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
import torch.fx as fx
from torch import nn

import msc.ops  # noqa: F401

try:  # NOTE: the kernels are decorated now, under the setting above, whatever a test later sets TRITON_INTERPRET to
    import msc.backends.compute.triton_attention  # noqa: F401
    import msc.backends.compute.triton_moe  # noqa: F401
    import msc.backends.compute.triton_norm  # noqa: F401
    import msc.backends.compute.triton_rotary  # noqa: F401
    import msc.backends.compute.triton_router  # noqa: F401
except ImportError:  # no triton: the kernel tests skip themselves
    pass

TINY = dict(
    model_type="mixtral", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
)


def tiny_spec_dict(**plan) -> dict:
    return {"model": {"config": dict(TINY), "seed": 0, "dtype": "float32"}, "device": "cpu", "plan": {"experts": {"nodes": 2}, **plan}}


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """The embedded default spec compiled once for the session."""
    from msc.compiler import compile_spec
    from msc.spec import default_spec

    return compile_spec(default_spec(), tmp_path_factory.mktemp("bundles") / "tiny")


@pytest.fixture(scope="session")
def tiny_hf(tiny_bundle):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_bundle.checkpoint_dir()), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def family_bundle(tmp_path_factory):
    """family name -> (spec dict, its compiled bundle, the transformers model of its checkpoint), each family
    compiled once a session: 2 expert nodes, batch 3, 9-token steps (prompts go in chunks beside decodes)."""
    from transformers import AutoModelForCausalLM

    from msc.compiler import compile_spec
    from msc.spec import parse_spec
    from tests.models.families import FAMILIES

    cache: dict = {}

    def get(name: str):
        if name not in cache:
            d = {"model": {"config": FAMILIES[name], "seed": 0, "dtype": "float32"}, "device": "cpu",
                 "plan": {"experts": {"nodes": 2}, "batch_size": 3}, "runtime": {"max_step_tokens": 9}}
            bundle = compile_spec(parse_spec(d), tmp_path_factory.mktemp(name) / "b")
            hf = AutoModelForCausalLM.from_pretrained(str(bundle.checkpoint_dir()), dtype=torch.float32).eval()
            cache[name] = (d, bundle, hf)
        return cache[name]

    return get


class ToyMoE(nn.Module):
    """A hand-made MoE stack calling the msc ops directly: L layers of x + experts(x, router(x))."""

    def __init__(self, layers=2, hidden=8, inter=16, experts=4, top_k=2, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.top_k = top_k
        self.proj = nn.Parameter(torch.randn(hidden, hidden, generator=g) * 0.3)
        self.gate = nn.ParameterList([nn.Parameter(torch.randn(experts, hidden, generator=g)) for _ in range(layers)])
        self.gate_up = nn.ParameterList([nn.Parameter(torch.randn(experts, 2 * inter, hidden, generator=g) * 0.3) for _ in range(layers)])
        self.down = nn.ParameterList([nn.Parameter(torch.randn(experts, hidden, inter, generator=g) * 0.3) for _ in range(layers)])

    def forward(self, x):  # x [T, H]
        x = x @ self.proj
        for layer in range(len(self.gate)):
            w, i = torch.ops.msc.router.default(x, self.gate[layer], self.top_k, layer)  # [T, K] each
            x = x + torch.ops.msc.experts.default(x, i, w, self.gate_up[layer], self.down[layer], layer, 0)  # [T, H]
        return x


@pytest.fixture
def toy():
    return ToyMoE()


@pytest.fixture
def toy_gm(toy):
    return fx.symbolic_trace(toy)


def dense_moe_reference(x, gate, gate_up, down, top_k):
    """Independent float64 MoE layer: every expert on every token, weighted by renormalised top-k softmax."""
    x = x.double()
    probs = torch.softmax(x @ gate.double().T, dim=-1)  # [T, E]
    top_w, top_i = probs.topk(top_k, dim=-1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    weights = torch.zeros_like(probs).scatter(1, top_i, top_w)  # [T, E]
    out = torch.zeros_like(x)
    for e in range(gate.shape[0]):
        g, u = (x @ gate_up[e].double().T).chunk(2, dim=-1)
        out += weights[:, e : e + 1] * ((torch.nn.functional.silu(g) * u) @ down[e].double().T)
    return out
