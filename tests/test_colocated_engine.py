"""The colocated program on the GPU engine's code path (paged KV cache, Triton decode attention, static
decode buffers): greedy tokens against the Hugging Face model itself.

Without a GPU the decode kernel runs in Triton's interpreter and CUDA graphs are off; the GPU test repeats
the check with CUDA graphs on and the fused MoE kernel.
"""
from __future__ import annotations

import pytest
import torch

from msc.verify import reference_generate

pytest.importorskip("triton", reason="triton is not installed")


def engine_tokens(hf, device, prompts, new, **kw):
    from msc.capture import capture
    from msc.colocated import from_hf_model
    from msc.models import adapter_for
    from msc.runtime.gpu_engine import ColocatedEngine

    cfg = hf.config
    captured = capture(cfg, adapter_for(cfg.model_type, cfg), "float32")
    gm = from_hf_model(captured, hf, device)
    engine = ColocatedEngine(gm, cfg.num_hidden_layers, device, max_batch=4, max_seq_len=64, page_size=4, **kw)
    return engine, engine.generate(prompts, new)


def test_greedy_tokens_match_hf_on_cpu(tiny_hf):
    prompts = [[5, 9, 14, 3, 7], [11, 2, 40], [1, 2, 3, 4, 5, 6, 7, 8, 9], [60]]  # lengths not multiples of the page
    engine, res = engine_tokens(tiny_hf, "cpu", prompts, 6, cuda_graphs=False)
    for p, got in zip(prompts, res.tokens):
        assert got == reference_generate(tiny_hf, p, 6)
    assert len(res.step_s) == 5
    assert engine.cache.num_free == engine.cache.num_blocks - 1  # every block back but the scratch one


def test_second_wave_reuses_the_cache(tiny_hf):
    """A smaller batch after a larger one: padding rows of the bucket must not disturb the real ones."""
    engine, _ = engine_tokens(tiny_hf, "cpu", [[3, 4, 5], [6, 7], [8], [9, 10]], 3, cuda_graphs=False)
    res = engine.generate([[21, 22, 23, 24]], 4)
    assert res.tokens[0] == reference_generate(tiny_hf, [21, 22, 23, 24], 4)


def test_bad_requests_are_clear_errors(tiny_hf):
    from msc.errors import MscError

    engine, _ = engine_tokens(tiny_hf, "cpu", [[1, 2]], 1, cuda_graphs=False)
    with pytest.raises(MscError, match="max_batch"):
        engine.generate([[1]] * 5, 2)
    with pytest.raises(MscError, match="max_seq_len"):
        engine.generate([[1] * 60], 10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_greedy_tokens_match_hf_on_gpu_with_cuda_graphs(tiny_hf):
    hf = tiny_hf.to("cuda")
    prompts = [[5, 9, 14, 3, 7], [11, 2, 40], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
    try:
        _, res = engine_tokens(hf, "cuda", prompts, 8, cuda_graphs=True)
        for p, got in zip(prompts, res.tokens):
            ids = torch.tensor([p], device="cuda")
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                              pad_token_id=hf.config.eos_token_id)[0, len(p):].tolist()
            assert got == ref
    finally:
        tiny_hf.to("cpu")


def test_bundle_colocated_program_matches_hf(tiny_bundle, tiny_hf):
    """The colocated program written into every bundle (the captured graph before the passes)."""
    from msc.runtime.gpu_engine import ColocatedEngine

    assert tiny_bundle.manifest["colocated"] == {"program": "colocated"}
    assert "colocated" not in {r["program"] for r in tiny_bundle.roles}  # not a role process
    gm = tiny_bundle.load_program("colocated", "cpu")
    engine = ColocatedEngine(gm, tiny_bundle.manifest["model"]["num_hidden_layers"], "cpu", max_batch=2,
                             max_seq_len=32, page_size=4, cuda_graphs=False)
    prompts = [[7, 8, 9, 10, 11], [3, 1]]
    res = engine.generate(prompts, 5)
    assert res.tokens == [reference_generate(tiny_hf, p, 5) for p in prompts]


def test_cpu_decode_without_triton_gathers_pages(tiny_hf, monkeypatch):
    """With no GPU and no interpreter, decode attention gathers the pages and calls SDPA: same tokens."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    prompts = [[5, 9, 14, 3, 7], [11, 2, 40]]
    _, res = engine_tokens(tiny_hf, "cpu", prompts, 6, cuda_graphs=False)
    assert res.tokens == [reference_generate(tiny_hf, p, 6) for p in prompts]


def test_time_decode_runs_a_synthetic_step_and_frees_its_pages(tiny_hf):
    """What msc profile times: a decode step at a given batch and context, sequences released afterwards."""
    engine, _ = engine_tokens(tiny_hf, "cpu", [[1, 2, 3]], 2, cuda_graphs=False)
    free = engine.cache.num_free
    s = engine.time_decode(batch=3, context=20, steps=3, warmup=1)
    assert 0 < s < 60
    assert engine.cache.num_free == free
