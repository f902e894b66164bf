"""The attention role with the paged KV cache (the GPU layout) in the disaggregated runtime: role
processes, ping-pong micro-batches and EOS-free greedy decoding give transformers' tokens."""
from __future__ import annotations

import pytest

from msc.compiler import compile_spec
from msc.runtime.launcher import run_bundle
from msc.spec import parse_spec
from msc.verify import reference_generate
from tests.conftest import tiny_spec_dict

pytest.importorskip("triton", reason="triton is not installed")
PROMPTS = [[5, 9, 14, 3, 7], [11, 2, 40], [1, 2, 3, 4, 5, 6, 7, 8, 9], [60, 61]]


@pytest.mark.parametrize("m", [1, 2])
def test_paged_attention_role_matches_hf(tmp_path, tiny_hf, m):
    d = tiny_spec_dict(microbatches=m)
    d["runtime"] = {"kv_cache": "paged"}
    bundle = compile_spec(parse_spec(d), tmp_path / "b")
    assert bundle.manifest["spec"]["runtime"]["kv_cache"] == "paged"
    res = run_bundle(bundle.path, PROMPTS, 5)
    assert res["outputs"] == [reference_generate(tiny_hf, p, 5) for p in PROMPTS]


def test_bad_kv_cache_value_is_refused():
    from msc.errors import MscError

    d = tiny_spec_dict()
    d["runtime"] = {"kv_cache": "ring"}
    with pytest.raises(MscError, match="kv_cache"):
        parse_spec(d)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("m", [1, 2])
def test_roles_on_one_gpu_match_hf(tmp_path, tiny_hf, m):
    """Attention and two expert nodes as three processes on one GPU: paged KV cache (auto on CUDA), Triton
    kernels, the cuda_ipc transport (auto for GPU roles on one host)."""
    d = tiny_spec_dict(microbatches=m)
    d["device"] = "cuda"
    bundle = compile_spec(parse_spec(d), tmp_path / "b")
    res = run_bundle(bundle.path, PROMPTS, 5)
    assert res["outputs"] == [reference_generate(tiny_hf, p, 5) for p in PROMPTS]


def test_prompts_go_in_chunks_under_the_step_token_budget(tmp_path, tiny_hf):
    """Prompts of 5, 3, 9 and 2 tokens with a budget of 6 tokens a step: prompts are cut into chunks (the
    9-token one over two steps), decodes share steps with chunks, and the tokens are transformers'."""
    d = tiny_spec_dict(microbatches=2)
    d["runtime"] = {"max_step_tokens": 6}
    bundle = compile_spec(parse_spec(d), tmp_path / "b")
    res = run_bundle(bundle.path, PROMPTS, 4)
    assert res["outputs"] == [reference_generate(tiny_hf, p, 4) for p in PROMPTS]
    recs = res["records"][0]
    fed = {}
    for r in recs:
        assert sum(n for _, n in r["prefill"]) + len(r["decode"]) <= 6
        for rid, n in r["prefill"]:
            fed.setdefault(rid, []).append(n)
    assert {rid: sum(ns) for rid, ns in fed.items()} == {"p0": 5, "p1": 3, "p2": 9, "p3": 2}
    assert len(fed["p2"]) >= 2
    assert len(res["decode_times"][0]) < len(res["step_times"][0])
