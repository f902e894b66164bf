"""The engine on the tiny Mixtral's colocated program (CPU, float32): continuous batching, chunked prefill,
preemption, cancellation and bad requests, every output checked against transformers' generate of that
prompt alone, and the schedule checked from the engine's own step records."""
from __future__ import annotations

import pytest
import torch

from msc.engine.build import build_engine
from msc.engine.engine import Engine
from msc.engine.request import SamplingParams
from msc.engine.runner import ModelRunner
from msc.errors import MscError
from msc.verify import reference_generate

PROMPTS = [[5, 17, 42], [7, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [9], [200, 100, 50, 25, 3, 1, 4, 1, 5]]


@pytest.fixture(autouse=True)
def _plain_cpu_attention(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the CPU path, not the kernel through Triton's interpreter


def _engine(bundle, program, **kw) -> Engine:
    runner = ModelRunner(program, bundle.manifest["model"]["num_hidden_layers"], "cpu")
    return Engine(runner, [bundle.manifest["model"]["eos_token_id"]], vocab_size=256,
                  **{"max_batch": 4, "max_step_tokens": 64, "max_seq_len": 128, **kw})


def _refs(hf, prompts, n):
    return [reference_generate(hf, p, n) for p in prompts]


def test_requests_arriving_while_others_decode_get_their_own_tokens(tiny_bundle, program, tiny_hf):
    eng = _engine(tiny_bundle, program, max_step_tokens=8)
    reqs = eng.generate(PROMPTS, SamplingParams(max_tokens=10), arrivals=[0, 0, 2, 3, 5])
    assert [r.output for r in reqs] == _refs(tiny_hf, PROMPTS, 10)
    recs = list(eng.records)
    assert all(r.tokens <= 8 for r in recs)
    # the 13-token prompt went in chunks under the 8-token budget, beside running decodes
    chunks = [n for r in recs for rid, n in r.prefill if rid == reqs[2].id]
    assert sum(chunks) == 13 and len(chunks) >= 2
    assert any(r.decode and any(rid == reqs[2].id for rid, _ in r.prefill) for r in recs)
    assert eng.scheduler.cache.num_free == eng.num_pages  # every page back


def test_a_short_request_finishes_before_a_long_one_that_started_earlier(tiny_bundle, program, tiny_hf):
    eng = _engine(tiny_bundle, program)
    long, short = eng.generate([[5, 17, 42], [7, 7]], [SamplingParams(max_tokens=40), SamplingParams(max_tokens=3)],
                               arrivals=[0, 10])
    assert long.output == reference_generate(tiny_hf, [5, 17, 42], 40)
    assert short.output == reference_generate(tiny_hf, [7, 7], 3)
    done_at = {rid: r.step for r in eng.records for rid, _ in r.finished}
    started = {rid: r.step for r in reversed(eng.records) for rid, _ in r.prefill}
    assert started[short.id] == 10 and done_at[short.id] < done_at[long.id]
    assert all(long.id in r.decode for r in eng.records if r.step in range(11, done_at[short.id] + 1))


def test_preemption_under_a_small_pool_gives_the_same_outputs(tiny_bundle, program, tiny_hf):
    eng = _engine(tiny_bundle, program, kv_tokens=64, max_seq_len=64)  # 4 pages of 16 tokens for 5 requests
    reqs = eng.generate(PROMPTS, SamplingParams(max_tokens=20), arrivals=[0, 0, 1, 2, 3])
    assert [r.output for r in reqs] == _refs(tiny_hf, PROMPTS, 20)
    preempted = [rid for r in eng.records for rid in r.preempted]
    assert preempted and sum(r.preemptions for r in reqs) == len(preempted)
    assert eng.scheduler.cache.num_free == eng.num_pages


def test_sampled_outputs_survive_preemption_and_batch_mixes(tiny_bundle, program):
    p = SamplingParams(max_tokens=20, temperature=0.9, top_k=40, seed=11, ignore_eos=True)
    alone = _engine(tiny_bundle, program).generate([PROMPTS[0]], p)[0].output
    crowded = _engine(tiny_bundle, program, kv_tokens=64, max_seq_len=64)
    mix = [p] + [SamplingParams(max_tokens=20, temperature=1.0, seed=i) for i in range(4)]
    reqs = crowded.generate(PROMPTS, mix, arrivals=[0, 0, 1, 2, 3])
    assert reqs[0].output == alone
    assert any(r.preempted for r in crowded.records)


def test_cancel_frees_pages_at_once_and_the_rest_go_on(tiny_bundle, program, tiny_hf):
    eng = _engine(tiny_bundle, program)
    a = eng.add_request("a", [5, 17, 42], SamplingParams(max_tokens=50))
    b = eng.add_request("b", [7, 7], SamplingParams(max_tokens=12))
    for _ in range(4):
        eng.step()
    free = eng.scheduler.cache.num_free
    assert eng.cancel("a") and not eng.cancel("a")
    assert a.finish_reason == "cancelled" and eng.scheduler.cache.num_free > free
    while eng.has_work:
        eng.step()
    assert b.output == reference_generate(tiny_hf, [7, 7], 12)


def test_bad_requests_fail_alone(tiny_bundle, program, tiny_hf):
    eng = _engine(tiny_bundle, program, kv_tokens=64, max_seq_len=128)
    with pytest.raises(MscError, match=r"needs 6 KV pages; the whole pool has 4"):
        eng.add_request("big", [1] * 80, SamplingParams(max_tokens=10))
    with pytest.raises(MscError, match="at most 128"):
        eng.add_request("long", [1] * 120, SamplingParams(max_tokens=10))
    with pytest.raises(MscError, match="outside the model's vocabulary"):
        eng.add_request("oov", [1, 999], SamplingParams(max_tokens=1))
    with pytest.raises(MscError, match="max_tokens must be a positive integer"):
        SamplingParams(max_tokens=0)
    assert [r.output for r in eng.generate([[7, 7]], SamplingParams(max_tokens=4))] == [reference_generate(tiny_hf, [7, 7], 4)]


def test_stop_tokens_and_eos(tiny_bundle, program, tiny_hf):
    eng = _engine(tiny_bundle, program)
    ref = reference_generate(tiny_hf, [5, 17, 42], 8)  # [22, 71, 83, ...]
    r = eng.generate([[5, 17, 42]], SamplingParams(max_tokens=8, stop_token_ids=(ref[2],)))[0]
    assert r.output == ref[:3] and r.finish_reason == "stop"


def test_sampled_first_tokens_follow_the_models_softmax(tiny_bundle, program, tiny_hf):
    """4000 one-token requests with different seeds at temperature 0.05 (the random model's logits are nearly
    flat: std 0.17): the frequencies of the first token against softmax(logits / 0.05) of transformers' own
    forward (chi-square with a generous bound; the same samples against temperature 0.1 must fail it)."""
    prompt, t, n = [5, 17, 42], 0.05, 4000
    eng = _engine(tiny_bundle, program, max_batch=256, max_step_tokens=4096)
    reqs = eng.generate([prompt] * n, [SamplingParams(max_tokens=1, temperature=t, seed=s) for s in range(n)])
    counts = torch.bincount(torch.tensor([r.output[0] for r in reqs]), minlength=256).double()
    with torch.no_grad():
        logits = tiny_hf(torch.tensor([prompt])).logits[0, -1].double()

    def chi2(temp):
        probs = torch.softmax(logits / temp, -1)
        keep = probs * n >= 5
        stat = ((counts[keep] - probs[keep] * n) ** 2 / (probs[keep] * n)).sum()
        rest = probs[~keep].sum() * n
        return float(stat + (counts[~keep].sum() - rest) ** 2 / max(float(rest), 1e-9)), int(keep.sum())

    stat, df = chi2(t)
    assert stat < df + 8 * (2 * df) ** 0.5, (stat, df)
    assert chi2(0.1)[0] > df + 8 * (2 * df) ** 0.5


def test_build_engine_sizes_come_from_the_spec(tiny_bundle, program):
    eng = build_engine(tiny_bundle.manifest, program, "cpu")
    assert eng.scheduler.max_batch == tiny_bundle.manifest["plan"]["batch_size"]
    assert eng.max_seq_len == 4096 and eng.scheduler.max_step_tokens == 8192
    # the tiny Mixtral: 2 layers x 2 KV heads x (16 + 16) values x 4 bytes = 512 bytes a token; the default pool
    # (batch_size sequences of 4096 tokens, 64 MiB) is under the CPU cap of 1 GiB
    assert eng.runner.kv_bytes_per_token() == 512 and eng.num_pages == 32 * 4096 // 16
    cache = eng.scheduler.cache
    assert (cache.k.numel() + cache.v.numel()) * 4 == (eng.num_pages + 1) * 16 * 512
