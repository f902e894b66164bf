"""The device sampler (msc/engine/sampler.py) against independent computations: argmax, the softmax it
should sample from, the supports top-k and top-p define, and batch invariance of seeded noise."""
from __future__ import annotations

import math

import pytest
import torch

from msc.engine.request import SamplingParams
from msc.engine.sampler import SamplingBatch, sample, uniform_noise


def _batch(params, positions):
    return SamplingBatch.build(params, positions, "cpu")


def _logits(rows=6, vocab=50, seed=0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_temperature_0_and_top_k_1_are_greedy():
    x = _logits()
    want = x.argmax(-1)
    for p in (SamplingParams(temperature=0.0), SamplingParams(temperature=1.3, top_k=1, seed=5)):
        assert torch.equal(sample(x, _batch([p] * 6, list(range(6)))), want)
    mixed = [SamplingParams(temperature=1.0, seed=1), SamplingParams()] * 3
    got = sample(x, _batch(mixed, [3] * 6))
    assert torch.equal(got[1::2], want[1::2])  # the greedy rows stay greedy beside sampled ones


def test_seeded_rows_do_not_depend_on_the_rest_of_the_batch():
    x = _logits(rows=8)
    p = SamplingParams(temperature=0.9, top_p=0.9, seed=1234)
    alone = sample(x[5:6], _batch([p], [17]))
    others = [SamplingParams(temperature=1.0, seed=i) for i in range(8)]
    others[5] = p
    positions = list(range(10, 18))
    positions[5] = 17
    in_batch = sample(x, _batch(others, positions))
    assert in_batch[5] == alone[0]
    shuffled = sample(torch.cat([x[5:6], x[:5]]), _batch([p] + others[:5], [17] + positions[:5]))
    assert shuffled[0] == alone[0]


def test_noise_is_uniform_and_independent_of_position():
    u = uniform_noise(torch.tensor([7, 7, 8]), torch.tensor([0, 1, 0]), 20000)  # [3, V]
    assert 0 < float(u.min()) and float(u.max()) < 1
    for row in u:
        assert abs(float(row.mean()) - 0.5) < 0.01 and abs(float(row.var()) - 1 / 12) < 0.003
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    # neighbouring columns of one row are uncorrelated
    c = torch.corrcoef(torch.stack([u[0, :-1], u[0, 1:]]))[0, 1]
    assert abs(float(c)) < 0.03


def _frequencies(logits_row, params, n):
    """Sample one row n times with n different counters (positions); frequency of each token."""
    x = logits_row[None].expand(n, -1)
    toks = sample(x, _batch([params] * n, list(range(n))))
    return torch.bincount(toks, minlength=logits_row.numel()).double() / n


def _chi2(freq, probs, n):
    keep = probs * n >= 5
    exp = probs[keep] * n
    obs = freq[keep] * n
    stat = float(((obs - exp) ** 2 / exp).sum())
    stat += float(((freq[~keep].sum() - probs[~keep].sum()) * n) ** 2 / max(probs[~keep].sum() * n, 1e-9))
    return stat, int(keep.sum())


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.6])
def test_sampled_frequencies_follow_the_softmax(temperature):
    row = torch.randn(12, generator=torch.Generator().manual_seed(3)) * 1.5
    n = 40000
    freq = _frequencies(row, SamplingParams(temperature=temperature, seed=9), n)
    want = torch.softmax(row.double() / temperature, -1)
    stat, df = _chi2(freq, want, n)
    assert stat < df + 8 * math.sqrt(2 * df), (stat, df)
    wrong = torch.softmax(row.double() / (temperature * 1.3), -1)  # the control: another temperature is rejected
    assert _chi2(freq, wrong, n)[0] > df + 8 * math.sqrt(2 * df)


def test_top_k_and_top_p_sample_the_renormalised_kept_set():
    row = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    probs = torch.softmax(row.double(), -1)
    n = 30000
    fk = _frequencies(row, SamplingParams(temperature=1.0, top_k=3, seed=1), n)
    assert float(fk[3:].sum()) == 0.0
    stat, df = _chi2(fk[:3], probs[:3] / probs[:3].sum(), n)
    assert stat < df + 8 * math.sqrt(2 * df)
    # top-p 0.8: the smallest prefix (by probability) whose mass reaches 0.8
    cum = probs.cumsum(0)
    k = int((cum < 0.8).sum()) + 1
    fp = _frequencies(row, SamplingParams(temperature=1.0, top_p=0.8, seed=2), n)
    assert float(fp[k:].sum()) == 0.0 and float(fp[k - 1]) > 0
    stat, df = _chi2(fp[:k], probs[:k] / probs[:k].sum(), n)
    assert stat < df + 8 * math.sqrt(2 * df)
