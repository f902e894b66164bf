"""Every family the CPU suite tests (its own adapters and the generic adapter's) on a GPU (issue 21; skipped
without one): float32 greedy tokens equal transformers' on the colocated engine (CUDA graphs for decode
steps) and as role processes over cuda_ipc; bfloat16 logits within bfloat16's own error of transformers'
bfloat16 forward."""
from __future__ import annotations

import pytest
import torch

from msc.compiler import compile_spec
from msc.engine.build import build_engine
from msc.engine.request import SamplingParams
from msc.runtime.launcher import run_bundle
from msc.spec import parse_spec
from tests.models.families import FAMILIES, GENERIC_FAMILIES

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
PROMPTS = [[5, 17, 42, 8], [7, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [9], [200, 100, 50, 25, 3]]
ARRIVALS = [0, 0, 2, 3, 5]
NEW = 6
ALL = {**FAMILIES, **GENERIC_FAMILIES}


def _compile(name, tmp_path, dtype="float32", **plan):
    d = {"model": {"config": ALL[name], "seed": 0, "dtype": dtype}, "device": "cuda",
         "plan": {"experts": {"nodes": 2}, "batch_size": 3, **plan}, "runtime": {"max_step_tokens": 9}}
    return compile_spec(parse_spec(d), tmp_path / f"{name}_{dtype}")


def _hf(bundle, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(bundle.checkpoint_dir()), dtype=dtype).to("cuda").eval()


def _refs(bundle):
    """transformers' greedy tokens (float32, on the GPU)."""
    hf = _hf(bundle, torch.float32)
    out = []
    for p in PROMPTS:
        ids = torch.tensor([p], device="cuda")
        gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                          pad_token_id=hf.config.eos_token_id if hf.config.pad_token_id is None else hf.config.pad_token_id)
        out.append(gen[0, len(p):].tolist())
    return out


@pytest.mark.parametrize("name", sorted(ALL))
def test_family_float32_tokens_on_the_gpu(tmp_path, name):
    """Colocated (continuous batching with arrivals, CUDA-graph decode) and as role processes (2 expert nodes,
    2 micro-batches): both give transformers' greedy tokens."""
    bundle = _compile(name, tmp_path, microbatches=2)
    refs = _refs(bundle)
    eng = build_engine(bundle.manifest, bundle.load_program(bundle.manifest["colocated"]["program"], "cuda"), "cuda")
    reqs = eng.generate(PROMPTS, SamplingParams(max_tokens=NEW), arrivals=ARRIVALS)
    assert [r.output for r in reqs] == refs, "colocated"
    res = run_bundle(bundle.path, PROMPTS, NEW, arrivals=ARRIVALS)
    assert res["outputs"] == refs, "role processes"
    assert res["transport"] == "cuda_ipc"


def _teacher_forced_logits(model, prompt, out):
    seq = torch.tensor([prompt + out[:-1]], device="cuda")
    with torch.no_grad():
        return model(seq).logits[0, len(prompt) - 1:].float().cpu()  # [steps, V]


@pytest.mark.parametrize("name", sorted(ALL))
def test_family_bfloat16_logits_on_the_gpu(tmp_path, name):
    """bfloat16 role processes: each step's logits within twice transformers' own bfloat16 error (its bfloat16
    forward against its float32 forward over the same tokens, plus a floor of 1/64 for logits near zero): the
    tolerance is bfloat16's, measured, not picked."""
    bundle = _compile(name, tmp_path, dtype="bfloat16")
    ours = run_bundle(bundle.path, PROMPTS, NEW, dump_logits=True)
    hf16, hf32 = _hf(bundle, torch.bfloat16), _hf(bundle, torch.float32)
    for prompt, out, logits in zip(PROMPTS, ours["outputs"], ours["logits"]):
        ref16 = _teacher_forced_logits(hf16, prompt, out)
        ref32 = _teacher_forced_logits(hf32, prompt, out)
        bf16_error = (ref16 - ref32).abs().max().item()
        err = (logits.float() - ref16).abs().max().item()
        assert err <= 2 * bf16_error + 1 / 64, (prompt, err, bf16_error)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_fused_norm_kernel_tokens_on_the_gpu(tmp_path, monkeypatch, name):
    """The RMSNorm kernel (MSC_NORM_KERNEL=1: msc::rms_norm / add_rms_norm in Triton, including Qwen3's per-head
    q/k norms and DeepSeek's latent norms) keeps float32 greedy tokens equal to transformers', colocated and as
    role processes; GPT-OSS's decode steps take the decode kernel with its sinks."""
    monkeypatch.setenv("MSC_NORM_KERNEL", "1")  # inherited by the role processes
    bundle = _compile(name, tmp_path)
    refs = _refs(bundle)
    eng = build_engine(bundle.manifest, bundle.load_program(bundle.manifest["colocated"]["program"], "cuda"), "cuda")
    fused = any("rms_norm" in str(n.target) for n in eng.runner.program.graph.nodes)
    assert fused == (name != "gpt_oss")  # GPT-OSS's norm scales in float32 before its cast: another chain, not fused
    reqs = eng.generate(PROMPTS, SamplingParams(max_tokens=NEW), arrivals=ARRIVALS)
    assert [r.output for r in reqs] == refs, "colocated"
    assert run_bundle(bundle.path, PROMPTS, NEW, arrivals=ARRIVALS)["outputs"] == refs, "role processes"
