"""KV cache of the attention role and the attention computation over it (packed-token layout).

One step packs the new tokens of several sequences side by side: sequence i contributes `n_i` tokens
starting at offset `start_i` of the T axis. Each sequence keeps its own growing K/V per layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class StepLayout:
    """Which sequences the T tokens of this step belong to: seq_ids[i] owns tokens [starts[i], starts[i]+lengths[i])."""

    seq_ids: list[int]
    lengths: list[int]

    @property
    def starts(self) -> list[int]:
        out, acc = [], 0
        for n in self.lengths:
            out.append(acc)
            acc += n
        return out


class KVCache:
    """Per-sequence, per-layer key/value tensors [nkv, S, d], grown by concatenation."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self._k: dict[int, list[Tensor | None]] = {}
        self._v: dict[int, list[Tensor | None]] = {}

    def add_sequence(self, seq_id: int) -> None:
        self._k[seq_id] = [None] * self.num_layers
        self._v[seq_id] = [None] * self.num_layers

    def drop_sequence(self, seq_id: int) -> None:
        self._k.pop(seq_id, None)
        self._v.pop(seq_id, None)

    def append(self, seq_id: int, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k/v [nkv, n, d] for one sequence and layer; return the whole cached k/v [nkv, S, d]."""
        ks, vs = self._k[seq_id], self._v[seq_id]
        ks[layer] = k if ks[layer] is None else torch.cat([ks[layer], k], dim=1)
        vs[layer] = v if vs[layer] is None else torch.cat([vs[layer], v], dim=1)
        return ks[layer], vs[layer]


def cached_attention(
    cache: KVCache, layout: StepLayout, q: Tensor, k: Tensor, v: Tensor, layer: int, scaling: float, sliding_window: int,
    sinks: Tensor | None = None,
) -> Tensor:
    """q [1, nh, T, d], k [1, nkv, T, d], v [1, nkv, T, dv] -> [1, T, nh, dv], causal per sequence, with the
    cache as prefix. `sinks` [nh]: per-head extra logits that share the softmax but carry no value (GPT-OSS)."""
    _, nh, t, _ = q.shape
    out = q.new_empty(1, t, nh, v.shape[-1])  # [1, T, nh, dv]
    for seq_id, start, n in zip(layout.seq_ids, layout.starts, layout.lengths):
        k_all, v_all = cache.append(seq_id, layer, k[0, :, start : start + n], v[0, :, start : start + n])  # [nkv, S, d]
        s = k_all.shape[1]
        q_pos = torch.arange(s - n, s, device=q.device)[:, None]  # [n, 1]
        k_pos = torch.arange(s, device=q.device)[None, :]  # [1, S]
        allowed = k_pos <= q_pos  # [n, S]
        if sliding_window > 0:
            allowed &= k_pos > q_pos - sliding_window
        qs = q[0, :, start : start + n]  # [nh, n, d]
        if sinks is None:
            o = F.scaled_dot_product_attention(qs, k_all, v_all, attn_mask=allowed, scale=scaling, enable_gqa=True)  # [nh, n, dv]
        else:
            o = _attention_with_sinks(qs, k_all, v_all, allowed, scaling, sinks)
        out[0, start : start + n] = o.transpose(0, 1)
    return out


def _attention_with_sinks(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scaling: float, sinks: Tensor) -> Tensor:
    """Softmax over [scores, sink] per head, the sink column dropped: q [nh, n, d], k/v [nkv, S, d] -> [nh, n, dv]."""
    rep = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(rep, dim=0), v.repeat_interleave(rep, dim=0)  # [nh, S, d]
    scores = (q @ k.transpose(1, 2)) * scaling  # [nh, n, S]
    scores = scores.masked_fill(~allowed, float("-inf"))
    sink = sinks.to(scores.dtype).reshape(-1, 1, 1).expand(-1, scores.shape[1], 1)  # [nh, n, 1]
    # the softmax runs in at least float32 (bf16/fp16 logits are upcast, float64 kept)
    logits = torch.cat([scores, sink], dim=-1)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    probs = torch.softmax(logits, dim=-1)[..., :-1].to(v.dtype)  # [nh, n, S]
    return probs @ v
