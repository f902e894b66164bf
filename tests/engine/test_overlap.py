"""The engine's overlapped steps (step n+1 queued before step n's tokens are read back, its tokens taken from
the device) on the tiny Mixtral's colocated program (CPU, float32, overlap forced on): the same tokens,
finish reasons and log-probabilities as sequential steps and as transformers' generate, through stops,
preemption and cancellation."""
from __future__ import annotations

import pytest
import torch

from msc.engine.engine import Engine, default_overlap
from msc.engine.request import SamplingParams
from msc.engine.runner import ModelRunner
from msc.errors import MscError
from msc.verify import reference_generate

PROMPTS = [[5, 17, 42], [7, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [9], [200, 100, 50, 25, 3, 1, 4, 1, 5]]


@pytest.fixture(autouse=True)
def _plain_cpu_attention(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("MSC_OVERLAP", raising=False)


class _CountingRunner(ModelRunner):
    """Counts the steps that took some of their tokens from the device (the previous step's samples)."""

    device_token_steps = 0

    def execute(self, step):
        if step.device_dst:
            self.device_token_steps += 1
            # the placeholder is what the host has; the device tokens must replace it
            assert all(step.token_ids[t] == 0 for t in step.device_dst)
        return super().execute(step)


def _engine(bundle, program, overlap: bool, **kw) -> Engine:
    runner = _CountingRunner(program, bundle.manifest["model"]["num_hidden_layers"], "cpu")
    return Engine(runner, [bundle.manifest["model"]["eos_token_id"]], vocab_size=256, overlap=overlap,
                  **{"max_batch": 4, "max_step_tokens": 64, "max_seq_len": 128, **kw})


def test_overlapped_steps_give_the_sequential_tokens_stops_and_logprobs(tiny_bundle, program, tiny_hf):
    ref0 = reference_generate(tiny_hf, PROMPTS[0], 12)
    params = [SamplingParams(max_tokens=12, stop_token_ids=(ref0[4],)),  # stops at the first of its tokens equal to its 5th
              SamplingParams(max_tokens=9, temperature=0.8, top_k=50, top_p=0.9, seed=3, logprobs=3),
              SamplingParams(max_tokens=7),
              SamplingParams(max_tokens=1, logprobs=2),  # its only token comes from its prompt's step
              SamplingParams(max_tokens=15, temperature=1.2, seed=8, ignore_eos=True)]
    arrivals = [0, 0, 1, 3, 4]
    runs = {}
    for overlap in (False, True):
        eng = _engine(tiny_bundle, program, overlap, max_step_tokens=8)
        runs[overlap] = (eng, eng.generate(PROMPTS, params, arrivals))
    seq, ovl = runs[False][1], runs[True][1]
    assert runs[True][0].runner.device_token_steps > 5 and runs[False][0].runner.device_token_steps == 0
    assert [r.output for r in ovl] == [r.output for r in seq]
    assert [r.finish_reason for r in ovl] == [r.finish_reason for r in seq]
    assert ovl[0].output == ref0[:ref0.index(ref0[4]) + 1] and ovl[0].finish_reason == "stop"
    assert ovl[2].output == reference_generate(tiny_hf, PROMPTS[2], 7)
    for a, b in zip(ovl, seq):
        assert len(a.logprobs) == len(b.logprobs) == (len(a.output) if a.params.logprobs is not None else 0)
        for (lp_a, top_a), (lp_b, top_b) in zip(a.logprobs, b.logprobs):
            assert lp_a == pytest.approx(lp_b, abs=1e-5) and [t for t, _ in top_a] == [t for t, _ in top_b]
    # the logprob of a greedy token is the model's own: checked against transformers' forward
    with torch.no_grad():
        lp = torch.log_softmax(tiny_hf(torch.tensor([PROMPTS[3]])).logits[0, -1].double(), -1)
    assert ovl[3].logprobs[0][0] == pytest.approx(float(lp.max()), abs=1e-4)
    eng = runs[True][0]
    assert not eng.has_work and eng.scheduler.cache.num_free == eng.num_pages


def test_overlap_under_preemption_gives_transformers_tokens(tiny_bundle, program, tiny_hf):
    eng = _engine(tiny_bundle, program, True, kv_tokens=64, max_seq_len=64)  # 4 pages of 16 tokens for 5 requests
    reqs = eng.generate(PROMPTS, SamplingParams(max_tokens=20), arrivals=[0, 0, 1, 2, 3])
    assert [r.output for r in reqs] == [reference_generate(tiny_hf, p, 20) for p in PROMPTS]
    assert any(r.preempted for r in eng.records) and eng.runner.device_token_steps > 0
    assert all(r.pending == 0 for r in reqs)
    assert eng.scheduler.cache.num_free == eng.num_pages


def test_a_request_cancelled_with_a_step_in_flight_gets_no_more_tokens(tiny_bundle, program, tiny_hf):
    eng = _engine(tiny_bundle, program, True)
    streamed = {"a": [], "b": []}
    finishes = []

    def on_token(req, toks):
        streamed[req.id] += toks
        if req.finished:
            finishes.append((req.id, req.finish_reason))

    a = eng.add_request("a", [5, 17, 42], SamplingParams(max_tokens=50), on_token)
    b = eng.add_request("b", [7, 7], SamplingParams(max_tokens=12), on_token)
    for _ in range(5):
        eng.step()
    assert a.pending == 1  # its token from the last step is still on the device
    got = list(a.output)
    assert eng.cancel("a")
    while eng.has_work:
        eng.step()
    assert a.output == got == streamed["a"] and a.finish_reason == "cancelled"
    assert got == reference_generate(tiny_hf, [5, 17, 42], len(got))
    assert b.output == streamed["b"] == reference_generate(tiny_hf, [7, 7], 12)
    assert finishes == [("a", "cancelled"), ("b", "length")]
    assert eng.scheduler.cache.num_free == eng.num_pages


def test_overlap_is_on_by_default_only_where_it_pays(tiny_bundle, program, monkeypatch):
    runner = ModelRunner(program, tiny_bundle.manifest["model"]["num_hidden_layers"], "cpu")
    assert not default_overlap(runner)  # a CPU: no device to hide the host's work behind
    monkeypatch.setenv("MSC_OVERLAP", "1")
    assert default_overlap(runner) and not default_overlap(runner, keep_logits=True)
    monkeypatch.setenv("MSC_OVERLAP", "yes please")
    with pytest.raises(MscError, match=r"MSC_OVERLAP='yes please': expected 1 / on / true / yes or 0 / off / false / no"):
        default_overlap(runner)
    monkeypatch.setenv("MSC_OVERLAP", "on")
    monkeypatch.setattr(runner, "remote", True)
    assert not default_overlap(runner)  # an attention role's tokens go to the experts through the host
    with pytest.raises(MscError, match="cannot overlap steps"):
        Engine(runner, [], max_batch=2, max_seq_len=64, overlap=True)
