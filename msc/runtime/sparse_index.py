"""DeepSeek sparse attention (DSA) at run time: the indexer's key cache and each query's top-k positions, and MLA
restricted to them (issue 26; the capture side is models/sparse_attention.py).

The indexer keys live in the paged KV cache (`PagedKVCache.index_k` [L, blocks, page, D]), written at the same
slots as the step's latents, so they share the sequences' pages, growth and freeing. Both functions run each
sequence on its own (its pages gathered): a reference implementation, correct on any device, with host reads of
the step's lengths, so a model with an indexer does not capture its decode steps in CUDA graphs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from msc.errors import MscError


def _pages(cache, table: list[int], total: int) -> Tensor:
    return torch.tensor(table[: -(-total // cache.page_size)], dtype=torch.long, device=cache.device)


def dsa_index(cache, meta, layer: int, q: Tensor, k: Tensor, weights: Tensor, topk: int, scale: float) -> Tensor:
    """q [1, T, Hi, D], k [1, T, D], weights [1, T, Hi] -> [1, T, topk] positions within each query's sequence
    (-1 where the sequence has fewer than topk tokens); writes k at meta.slots first."""
    from msc.runtime.paged_kv import _spans_of

    if cache.index_k is None:
        raise MscError("msc::dsa_index: the KV cache has no indexer keys (it was made for a model without an indexer)")
    t, d = k.shape[1], k.shape[2]
    cache.index_k[layer].view(-1, d).index_copy_(0, meta.slots, k[0].to(cache.index_k.dtype))
    out = torch.full((1, t, topk), -1, dtype=torch.int64, device=q.device)
    for start, n, total, table in _spans_of(meta):
        if total == 0:
            continue  # a padding row
        keys = cache.index_k[layer][_pages(cache, table, total)].reshape(-1, d)[:total].float()  # [S, D]
        scores = F.relu(torch.einsum("nhd,sd->nhs", q[0, start:start + n].float(), keys)) * scale  # [n, Hi, S]
        index_scores = torch.einsum("nh,nhs->ns", weights[0, start:start + n].float(), scores)  # [n, S]
        q_pos = torch.arange(total - n, total, device=q.device)[:, None]  # [n, 1]
        index_scores = index_scores.masked_fill(torch.arange(total, device=q.device)[None, :] > q_pos, float("-inf"))
        kk = min(topk, total)
        out[0, start:start + n, :kk] = index_scores.topk(kk, dim=-1).indices
    return out


def selected_attention(cache, layer: int, q_abs: Tensor, spans, indices: Tensor, scaling: float) -> Tensor:
    """MLA's absorbed queries q_abs [1, nh, T, r + dr] over only the positions `indices` [1, T, topk] picks in
    their own sequence (and never a later one) -> [1, T, nh, r] (values: the latent)."""
    _, nh, t, _ = q_abs.shape
    r = cache.v_head_dim
    out = q_abs.new_zeros(1, t, nh, r)
    for start, n, total, table in spans:
        if total == 0:
            continue
        pairs = cache.k[layer][_pages(cache, table, total)].reshape(-1, cache.head_dim)[:total].to(q_abs.dtype)  # [S, r+dr]
        pick = indices[0, start:start + n]  # [n, topk]
        allowed = torch.zeros(n, total + 1, dtype=torch.bool, device=q_abs.device)  # column `total`: the -1 entries
        allowed.scatter_(1, torch.where(pick < 0, total, pick), True)
        allowed = allowed[:, :total] & (torch.arange(total, device=q_abs.device)[None, :]
                                        <= torch.arange(total - n, total, device=q_abs.device)[:, None])  # [n, S]
        scores = torch.einsum("hnc,sc->hns", q_abs[0, :, start:start + n], pairs) * scaling  # [nh, n, S]
        probs = torch.softmax(scores.float().masked_fill(~allowed, float("-inf")), dim=-1).to(pairs.dtype)
        out[0, start:start + n] = torch.einsum("hns,sr->nhr", probs, pairs[:, :r])
    return out
