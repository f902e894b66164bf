"""The engine on a GPU (skipped without one): CUDA graphs for decode steps, eager mixed steps, the role
processes over cuda_ipc, and GPT-OSS's sinks through the gathered path; tokens against transformers'."""
from __future__ import annotations

import pytest
import torch

from msc.compiler import compile_spec
from msc.engine.build import build_engine
from msc.engine.request import SamplingParams
from msc.runtime.launcher import run_bundle
from msc.spec import parse_spec
from msc.verify import reference_generate
from tests.models.families import FAMILIES

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
PROMPTS = [[5, 17, 42, 8], [7, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [9], [200, 100, 50, 25, 3]]
ARRIVALS = [0, 0, 2, 3, 5]


def _family(name, tmp_path, new=7, **plan):
    d = {"model": {"config": FAMILIES[name], "seed": 0, "dtype": "float32"}, "device": "cuda",
         "plan": {"experts": {"nodes": 2}, "batch_size": 3, **plan}, "runtime": {"max_step_tokens": 9}}
    bundle = compile_spec(parse_spec(d), tmp_path / name)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(bundle.checkpoint_dir()), dtype=torch.float32).eval()
    return bundle, [reference_generate(hf, p, new) for p in PROMPTS]


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_colocated_engine_on_the_gpu(tmp_path, name):
    bundle, refs = _family(name, tmp_path)
    gm = bundle.load_program(bundle.manifest["colocated"]["program"], "cuda")
    eng = build_engine(bundle.manifest, gm, "cuda")
    reqs = eng.generate(PROMPTS, SamplingParams(max_tokens=7), arrivals=ARRIVALS)
    assert [r.output for r in reqs] == refs
    assert eng.runner._graphs  # decode-only steps replayed a CUDA graph


@pytest.mark.parametrize("stage_graphs", ["off", "on"])
def test_role_processes_on_the_gpu(tmp_path, stage_graphs):
    bundle, refs = _family("mixtral", tmp_path, microbatches=2)
    res = run_bundle(bundle.path, PROMPTS, 7, arrivals=ARRIVALS, env={"MSC_STAGE_GRAPHS": stage_graphs})
    assert res["outputs"] == refs and res["transport"] == "cuda_ipc"
    assert (res["captured_segments"][0] > 0) == (stage_graphs == "on")


@pytest.mark.skipif(__import__("shutil").which("nvidia-cuda-mps-control") is None, reason="needs NVIDIA's MPS control")
def test_role_processes_under_mps(tmp_path):
    bundle, refs = _family("mixtral", tmp_path, microbatches=2)
    res = run_bundle(bundle.path, PROMPTS, 7, arrivals=ARRIVALS, mps={"attention": 40, "expert": 60})
    assert res["outputs"] == refs
    assert res["device_steps"][0] > 0  # under MPS the device exchange is on by default


# NOTE: deepseek_v3 decodes through the MLA latent kernel (backends/compute/triton_mla.py)
@pytest.mark.parametrize("name,m", [("mixtral", 1), ("qwen3_moe", 2), ("qwen2_moe", 3), ("gpt_oss", 4),
                                    ("deepseek_v3", 2)])
def test_device_exchange_on_the_gpu(tmp_path, name, m):
    """Decode steps as one CUDA graph per role with the hand-offs by device flags, prompt steps eagerly (forced
    on without MPS: the roles time-slice the GPU, slowly but correctly)."""
    bundle, refs = _family(name, tmp_path, new=12, microbatches=m)
    res = run_bundle(bundle.path, PROMPTS, 12, arrivals=ARRIVALS, env={"MSC_DEVICE_EXCHANGE": "on"})
    assert res["outputs"] == refs and res["transport"] == "cuda_ipc"
    assert res["device_steps"][0] > 0 and res["captured_segments"][0] > 0  # replayed graphs, not only warm-ups


def test_overlapped_steps_on_the_gpu_match_sequential_ones(tmp_path):
    """Overlap is the GPU default: the graph path takes the last step's tokens on the device and its inputs from
    pinned memory; greedy (with a stop token), seeded sampling and logprobs give what sequential steps give."""
    bundle, refs = _family("mixtral", tmp_path, new=12)
    gm = bundle.load_program(bundle.manifest["colocated"]["program"], "cuda")
    params = [SamplingParams(max_tokens=12, stop_token_ids=(refs[0][5],)),
              SamplingParams(max_tokens=12, temperature=0.9, top_k=40, top_p=0.9, seed=5, logprobs=2),
              SamplingParams(max_tokens=12), SamplingParams(max_tokens=3, logprobs=1),
              SamplingParams(max_tokens=12, temperature=1.1, seed=9, ignore_eos=True)]
    runs = []
    for overlap in (None, False):  # None: the engine's default on a GPU
        eng = build_engine(bundle.manifest, gm, "cuda")
        if overlap is not None:
            eng.overlap = overlap
        device_steps = []
        execute = eng.runner.execute
        eng.runner.execute = lambda step, ex=execute, seen=device_steps: (seen.append(bool(step.device_dst)), ex(step))[1]
        runs.append((eng, eng.generate(PROMPTS, params, arrivals=ARRIVALS), device_steps))
    (ovl_eng, ovl, ovl_dev), (_, seq, seq_dev) = runs
    assert ovl_eng.overlap and any(ovl_dev) and not any(seq_dev)
    assert [r.output for r in ovl] == [r.output for r in seq]
    assert [r.finish_reason for r in ovl] == [r.finish_reason for r in seq]
    assert ovl[0].output == refs[0][:refs[0].index(refs[0][5]) + 1] and ovl[2].output == refs[2]
    for a, b in zip(ovl, seq):
        assert [t for t, _ in a.logprobs] == pytest.approx([t for t, _ in b.logprobs], abs=1e-5)
    assert ovl_eng.runner._graphs and ovl_eng.scheduler.cache.num_free == ovl_eng.num_pages


SHARED = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79, 50, 28, 84, 19, 71, 69, 39, 93, 75, 10, 58,
          20, 97, 49, 44, 59, 23]  # 33 tokens: two full pages of 16


def test_prefix_caching_on_the_gpu(tmp_path):
    """Requests that share a 33-token prefix, arriving while others decode, colocated (overlapped steps and CUDA
    graphs, the GPU defaults) and as role processes over cuda_ipc: transformers' float32 tokens, with the shared
    pages attached instead of computed."""
    from transformers import AutoModelForCausalLM

    d = {"model": {"config": FAMILIES["mixtral"], "seed": 0, "dtype": "float32"}, "device": "cuda",
         "plan": {"experts": {"nodes": 2}, "batch_size": 4}}  # whole prompts in one step: the pages cached are fixed
    bundle = compile_spec(parse_spec(d), tmp_path / "b")
    hf = AutoModelForCausalLM.from_pretrained(str(bundle.checkpoint_dir()), dtype=torch.float32).eval()
    prompts = [SHARED + [7], SHARED + [8, 9], SHARED[:20] + [1, 2], SHARED + [7, 4]]
    refs = [reference_generate(hf, p, 7) for p in prompts]
    arrivals = [0, 2, 3, 5]
    gm = bundle.load_program(bundle.manifest["colocated"]["program"], "cuda")
    eng = build_engine(bundle.manifest, gm, "cuda")
    reqs = eng.generate(prompts, SamplingParams(max_tokens=7), arrivals=arrivals)
    assert [r.output for r in reqs] == refs
    assert eng.overlap and eng.runner._graphs
    cached = [n for r in eng.records for _, n in r.cached]
    assert cached == [32, 16, 32]  # two pages each; the third prompt's first page only
    res = run_bundle(bundle.path, prompts, 7, arrivals=arrivals)
    assert res["outputs"] == refs and res["transport"] == "cuda_ipc"
    assert [n for r in res["records"][0] for _, n in r["cached"]] == [32, 16, 32]
