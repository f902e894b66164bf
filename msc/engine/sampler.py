"""Sampling on the device, inside the step: greedy, temperature, top-k, top-p and per-request seeds.

NOTE: seeded sampling must give a request the same tokens whatever else shares its batch, so the noise
cannot come from one generator stepped over the batch. Each request draws its noise from a counter-based
hash of (seed, position of the token being sampled, vocabulary index): a pure function of the request, and
a handful of integer tensor ops that run on any device, batched, without a host round trip. The draw is the
Gumbel-max trick: argmax(logits / T + Gumbel noise) is a sample of softmax(logits / T); top-k and top-p
only set the logits outside the kept set to -inf first, so the sample is one of the renormalised
distribution over the kept tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from msc.runtime.transfer import tensor_to_device

_M32 = 0xFFFFFFFF


def _fmix32(h: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding values in [0, 2^32) (wrapping products)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def uniform_noise(seeds: Tensor, positions: Tensor, vocab: int) -> Tensor:
    """U(0, 1) noise [B, V] (float32, never 0 or 1) that depends only on each row's (seed, position) and
    the column: seeds [B] int64, positions [B] int64."""
    dev = seeds.device
    col = torch.arange(vocab, device=dev, dtype=torch.int64)  # [V]
    row = _fmix32((seeds & _M32) ^ _fmix32(((seeds >> 32) & _M32) ^ (positions & _M32)))  # [B]
    h = _fmix32((row[:, None] ^ _fmix32(col[None, :] + 0x9E3779B9)) & _M32)  # [B, V]
    return ((h >> 8).to(torch.float32) + 0.5) / float(1 << 24)  # 24 random bits: (0, 1)


@dataclass
class SamplingBatch:
    """Per-row sampling parameters of one step, as device tensors [B]."""

    temperature: Tensor | None  # float32; 0 = greedy (None: every row greedy)
    top_k: Tensor | None  # int64; 0 = all
    top_p: Tensor | None  # float32; 1 = all
    seeds: Tensor | None  # int64
    positions: Tensor | None  # int64: the position the sampled token will take (the noise counter)
    all_greedy: bool = False

    @classmethod
    def build(cls, params: list, positions: list[int], device) -> "SamplingBatch":
        """From the rows' SamplingParams (msc.engine.request) and the positions their new tokens take. An
        all-greedy batch makes no tensors (sample() then only takes the argmax)."""
        if all(p.greedy for p in params):
            return cls(None, None, None, None, None, all_greedy=True)
        device = torch.device(device)
        return cls(tensor_to_device([p.temperature for p in params], torch.float32, device),
                   tensor_to_device([p.top_k for p in params], torch.int64, device),
                   tensor_to_device([p.top_p for p in params], torch.float32, device),
                   tensor_to_device([p.seed_value for p in params], torch.int64, device),
                   tensor_to_device(positions, torch.int64, device))


def sample(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Next token of each row: logits [B, V] -> [B] int64 (on the logits' device; no host sync)."""
    greedy = logits.argmax(dim=-1)  # [B]
    if batch.all_greedy:
        return greedy
    x = logits.float()
    temp = batch.temperature.clamp_min(1e-6)[:, None]  # [B, 1]
    x = x / temp
    v = x.shape[-1]
    # NOTE: one descending sort serves both filters: a token's rank decides top-k, the mass of the tokens
    # ranked above it decides top-p (the first token is always kept)
    sorted_x, order = x.sort(dim=-1, descending=True)  # [B, V]
    rank = torch.arange(v, device=x.device)[None, :]  # [1, V]
    k = torch.where(batch.top_k > 0, batch.top_k, torch.full_like(batch.top_k, v))[:, None]  # [B, 1]
    probs = torch.softmax(sorted_x, dim=-1)  # [B, V]
    mass_before = probs.cumsum(dim=-1) - probs  # [B, V]
    drop_sorted = (rank >= k) | (mass_before >= batch.top_p[:, None])  # [B, V]
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)  # [B, V] back in vocabulary order
    x = x.masked_fill(drop, float("-inf"))
    u = uniform_noise(batch.seeds, batch.positions, v)  # [B, V]
    gumbel = -torch.log(-torch.log(u))
    sampled = (x + gumbel).argmax(dim=-1)  # [B]
    return torch.where(batch.temperature > 0, sampled, greedy)


def token_logprobs(logits: Tensor, tokens: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Log-probabilities of the model's distribution (before temperature and filters): logits [B, V], the
    sampled tokens [B] -> (theirs [B], the k largest [B, k], their token ids [B, k])."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # [B, V]
    chosen = lp.gather(1, tokens[:, None])[:, 0]  # [B]
    top_vals, top_ids = lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], tokens[:, None][:, :0])  # [B, k]
    return chosen, top_vals, top_ids
