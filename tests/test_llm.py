"""The offline API (msc.LLM / msc.SamplingParams) against transformers, and bundles without a tokenizer."""
from __future__ import annotations

import pytest

import msc
from msc.errors import MscError
from msc.verify import reference_generate


@pytest.fixture(scope="module")
def llm(tiny_bundle):
    with msc.LLM(tiny_bundle.path) as engine:  # the bundle's role processes
        yield engine


def test_greedy_generation_of_text_and_ids_equals_transformers(llm, tiny_hf):
    tok = llm.tokenizer
    outs = llm.generate(["Hello, how are", [5, 17, 42]], msc.SamplingParams(max_tokens=8))
    for out in outs:
        want = reference_generate(tiny_hf, out.prompt_token_ids, 8)
        assert out.outputs[0].token_ids == want
        assert out.outputs[0].text == tok.decode(want, skip_special_tokens=True)
    assert outs[0].prompt == "Hello, how are" and outs[0].prompt_token_ids == tok("Hello, how are").input_ids


def test_seeded_choices_repeat_and_match_the_colocated_engine(llm, tiny_bundle):
    params = msc.SamplingParams(n=3, max_tokens=10, temperature=1.0, top_p=0.9, seed=11, ignore_eos=True, logprobs=1)
    a = llm.generate("Once upon a time", params)[0].outputs
    b = llm.generate("Once upon a time", params)[0].outputs
    with msc.LLM(tiny_bundle.path, colocated=True) as local:
        c = local.generate("Once upon a time", params)[0].outputs
    assert [o.token_ids for o in a] == [o.token_ids for o in b] == [o.token_ids for o in c]
    assert len({tuple(o.token_ids) for o in a}) > 1 and [o.index for o in a] == [0, 1, 2]
    for o in a:  # one logprob entry per token, the top-1 alternative included
        assert len(o.logprobs) == 10 and all(len(top) == 1 and lp <= top[0][1] + 1e-6 for lp, top in o.logprobs)


def test_a_stop_string_ends_a_choice_early(llm):
    full = llm.generate("Hello", msc.SamplingParams(max_tokens=16, ignore_eos=True))[0].outputs[0].text
    stop = full[4:6]
    out = llm.generate("Hello", msc.SamplingParams(max_tokens=16, ignore_eos=True, stop=stop))[0].outputs[0]
    assert out.text == full[:full.find(stop)] and out.finish_reason == "stop"


def test_bad_parameters_are_refused_before_anything_runs(llm):
    with pytest.raises(MscError, match="n must be"):
        msc.SamplingParams(n=0)
    with pytest.raises(MscError, match="top_p"):
        msc.SamplingParams(top_p=0)
    with pytest.raises(MscError, match="outside the model's vocabulary"):
        llm.generate([[5, 999]])


@pytest.fixture(scope="module")
def no_tokenizer_bundle(tmp_path_factory, tiny_hf):
    """A checkpoint folder written by transformers without tokenizer files, compiled."""
    from msc.compiler import compile_spec
    from msc.spec import parse_spec

    folder = tmp_path_factory.mktemp("ckpt_no_tok")
    tiny_hf.save_pretrained(folder)
    spec = parse_spec({"model": {"path": str(folder), "dtype": "float32"}, "device": "cpu", "plan": {"experts": {"nodes": 2}}})
    return compile_spec(spec, tmp_path_factory.mktemp("b") / "no-tok")


def test_a_bundle_without_a_tokenizer_serves_token_ids_and_refuses_text(no_tokenizer_bundle, tiny_hf):
    from fastapi.testclient import TestClient

    from msc.runtime.serving import ColocatedServingEngine
    from msc.server import create_app

    assert no_tokenizer_bundle.manifest["model"]["tokenizer"] is None
    with msc.LLM(no_tokenizer_bundle.path, colocated=True) as local:
        assert local.tokenizer is None
        with pytest.raises(MscError, match="needs a tokenizer"):
            local.generate("Hello")
        out = local.generate([[5, 17, 42]], msc.SamplingParams(max_tokens=6))[0].outputs[0]
        assert out.token_ids == reference_generate(tiny_hf, [5, 17, 42], 6) and out.text == ""
    with ColocatedServingEngine(no_tokenizer_bundle.path) as engine, TestClient(create_app(engine)) as client:
        r = client.post("/v1/completions", json={"prompt": "Hello"})
        assert r.status_code == 400 and "needs a tokenizer" in r.json()["error"]["message"]
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        r = client.post("/v1/completions", json={"prompt": [5, 17, 42], "max_tokens": 6, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == reference_generate(tiny_hf, [5, 17, 42], 6)
