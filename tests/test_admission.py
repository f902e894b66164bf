"""Admission (msc/admission.py): the limits a bundle's manifest gives are the engine's own, every server path
refuses beyond them before anything runs, and the engine refuses by itself for paths that bypass the server."""
from __future__ import annotations

import pytest

from msc.admission import AdmissionError, Limits
from msc.compiler import compile_spec
from msc.engine.request import SamplingParams
from msc.errors import MscError
from msc.spec import parse_spec
from tests.conftest import tiny_spec_dict


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory):
    """A bundle whose explicit KV pool (100 tokens: 7 pages of 16) is smaller than its max_seq_len 256."""
    spec = parse_spec({**tiny_spec_dict(), "runtime": {"max_seq_len": 256, "kv_cache_tokens": 100}})
    return compile_spec(spec, tmp_path_factory.mktemp("admission") / "b")


@pytest.fixture(scope="module")
def small_pool(small_bundle):
    """A started colocated server of small_bundle."""
    from msc.runtime.serving import ColocatedServingEngine

    eng = ColocatedServingEngine(small_bundle.path, device="cpu").start()
    try:
        yield eng
    finally:
        eng.close()


@pytest.fixture
def bare_engine(small_bundle):
    """small_bundle's engine with no server thread stepping it (this test's thread drives it)."""
    from msc.runtime.serving import ColocatedServingEngine

    return ColocatedServingEngine(small_bundle.path, device="cpu").engine


def test_the_limits_are_the_engines_own(small_bundle, bare_engine):
    """Limits.of(manifest) (no engine built) against the engine built from the same manifest: the longest
    sequence its add_request takes, found by trying."""
    limits = Limits.of(small_bundle.manifest)
    eng = bare_engine
    assert (limits.max_seq_len, limits.kv_tokens) == (eng.max_seq_len, 100)

    def engine_takes(total: int) -> bool:
        try:
            eng.add_request(f"probe-{total}", [1] * (total - 1), SamplingParams(max_tokens=1))
        except MscError:
            return False
        eng.cancel(f"probe-{total}")
        return True

    assert limits.per_sequence == eng.num_pages * eng.page_size == 112
    assert engine_takes(limits.per_sequence) and not engine_takes(limits.per_sequence + 1)


def test_the_default_pool_leaves_max_seq_len_as_the_bound(tiny_bundle):
    from msc.engine.build import max_seq_len_of

    limits = Limits.of(tiny_bundle.manifest)
    assert limits.kv_tokens is None and limits.per_sequence == max_seq_len_of(tiny_bundle.manifest) == 4096


def test_refusals_name_the_limit_and_the_parameter():
    limits = Limits(max_seq_len=4096, kv_tokens=None)
    limits.check(4095, 1)
    with pytest.raises(AdmissionError) as e:
        limits.check(100_000, 16)
    assert e.value.param == "prompt" and str(e.value) == (
        "the prompt has 100000 tokens; this deployment takes at most 4096 tokens per sequence (prompt + max_tokens), "
        "and at least one must be left to generate")
    with pytest.raises(AdmissionError) as e:
        limits.check(3, 65_536)
    assert e.value.param == "max_tokens" and str(e.value) == (
        "the prompt (3 tokens) plus max_tokens (65536) is 65539 tokens; this deployment takes at most 4096 tokens per "
        "sequence (prompt + max_tokens)")
    with pytest.raises(AdmissionError, match=r"at most 112 tokens per sequence \(prompt \+ max_tokens\) \(its KV pool "
                                             r"holds 112 tokens\)"):
        Limits(max_seq_len=256, kv_tokens=100).check(100, 13)


def test_the_server_refuses_before_anything_is_queued(small_pool):
    """submit raises at once (no handle, nothing in the engine's inbox), and the engine still serves."""
    with pytest.raises(AdmissionError, match="the prompt has 100000 tokens"):
        small_pool.submit([1] * 100_000, 4)
    with pytest.raises(AdmissionError, match=r"plus max_tokens \(65536\)"):
        small_pool.submit([1, 2], params=SamplingParams(max_tokens=65_536))
    assert not small_pool.engine._inbox and small_pool.health()["unfinished"] == 0
    assert len(small_pool.submit([1, 2], 3).result(timeout=60).token_ids) <= 3


def test_msc_llm_gets_the_same_refusal(small_pool):
    from msc.llm import submit_choices
    from msc.llm import SamplingParams as LLMParams

    with pytest.raises(AdmissionError, match="at most 112 tokens per sequence"):
        submit_choices(small_pool, None, [1] * 200, LLMParams(max_tokens=4))


def test_the_engine_refuses_by_itself_without_allocating(bare_engine):
    """A path that reaches the engine directly (`msc run` prompt files, Engine.generate): the request too long
    finishes with reason "error" and a message, takes no KV page, and the others still run."""
    done = bare_engine.generate([[1] * 100_000, [5, 17], [1, 2] * 60], SamplingParams(max_tokens=4, ignore_eos=True))
    assert [r.finish_reason for r in done] == ["error", "length", "error"]
    assert "this engine holds sequences of at most 256" in done[0].error
    assert "needs 8 KV pages; the whole pool has 7" in done[2].error
    assert len(done[1].output) == 4 and bare_engine.stats()["kv_pages_used"] == 0
