"""State layers and DeepSeek's sparse attention on a GPU (issue 26; skipped without one): Qwen3-Next (Gated DeltaNet), Nemotron-H (Mamba-2, up-only
experts), Jamba, Kimi-Linear and MiniMax compiled for `device: cuda`, float32, greedy tokens against transformers':
on the colocated engine (decode steps replay a CUDA graph that gathers and scatters the state slots) and as role
processes over cuda_ipc."""
from __future__ import annotations

import pytest
import torch

from msc.compiler import compile_spec
from msc.engine.build import build_engine
from msc.engine.request import SamplingParams
from msc.runtime.launcher import run_bundle
from msc.spec import parse_spec
from msc.verify import reference_generate
from tests.models.families import RUNNING_STATE_FAMILIES, SPARSE_FAMILIES

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
PROMPTS = [[5, 17, 42, 8], [7, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [9], [200, 100, 50, 25, 3]]
ARRIVALS = [0, 0, 2, 3, 5]
FAMILIES = ["qwen3_next", "nemotron_h", "jamba", "kimi_linear", "minimax"]


def _bundle(name, tmp_path, **plan):
    from transformers import AutoModelForCausalLM

    d = {"model": {"config": {**RUNNING_STATE_FAMILIES, **SPARSE_FAMILIES}[name], "seed": 0, "dtype": "float32"},
         "device": "cuda",
         "plan": {"experts": {"nodes": 2}, "batch_size": 3, **plan}, "runtime": {"max_step_tokens": 9}}
    bundle = compile_spec(parse_spec(d), tmp_path / name)
    hf = AutoModelForCausalLM.from_pretrained(str(bundle.checkpoint_dir()), dtype=torch.float32).to("cuda").eval()
    return bundle, [reference_generate(hf, p, 7) for p in PROMPTS]


@pytest.mark.parametrize("name", FAMILIES)
def test_colocated_state_layers_on_the_gpu(tmp_path, name):
    bundle, refs = _bundle(name, tmp_path)
    eng = build_engine(bundle.manifest, bundle.load_program(bundle.manifest["colocated"]["program"], "cuda"), "cuda")
    reqs = eng.generate(PROMPTS, SamplingParams(max_tokens=7), arrivals=ARRIVALS)
    assert [r.output for r in reqs] == refs
    assert eng.runner._graphs  # decode-only steps replayed a CUDA graph
    assert eng.scheduler.cache.states.device.type == "cuda"


def test_sparse_attention_on_the_gpu(tmp_path):
    """DeepSeek-V3.2's indexer (top-4 positions a query): eager steps (no CUDA graphs for it), transformers' tokens."""
    bundle, refs = _bundle("deepseek_v32", tmp_path)
    eng = build_engine(bundle.manifest, bundle.load_program(bundle.manifest["colocated"]["program"], "cuda"), "cuda")
    reqs = eng.generate(PROMPTS, SamplingParams(max_tokens=7), arrivals=ARRIVALS)
    assert [r.output for r in reqs] == refs
    assert not eng.runner._graphs


@pytest.mark.parametrize("name", ["qwen3_next", "nemotron_h"])
def test_state_layers_as_role_processes_on_the_gpu(tmp_path, name):
    bundle, refs = _bundle(name, tmp_path, microbatches=2)
    res = run_bundle(bundle.path, PROMPTS, 7, arrivals=ARRIVALS)
    assert res["outputs"] == refs
