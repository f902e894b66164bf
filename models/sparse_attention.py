"""Indexed sparse attention at capture (DeepSeek's DSA: DeepSeek-V3.2, GLM-MoE-DSA).

Each DSA attention layer has an *indexer*: a small multi-head scorer with its own key per token (one
`index_head_dim` vector, cached beside the latent) that picks, for every query, the `index_topk` past tokens
the MLA attention may see. transformers computes the scores over the step's whole token list, which in msc
packs several sequences and holds none of their past, so msc gives the indexer module its own forward while
capturing: the module's projections, norm and rotary embedding as written, then

    msc::dsa_index(q [1, T, Hi, D], k [1, T, D], weights [1, T, Hi], layer, topk, scale) -> [1, T, topk]

whose runtime keeps each token's indexer key in the paged cache and picks the top-k positions of each query
within its own sequence (msc/runtime/sparse_index.py). The attention then receives the picks through
transformers' attention interface (`indices=`) and msc::mla_attention attends to them only.

NOTE: the attention module reads `attention_mask[:, 0]` before calling its indexer; msc passes no mask (the
runtime builds it per sequence), so a pre-hook hands the module a one-element placeholder that the indexer and
msc's attention both ignore (and the graph drops).
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from msc.errors import MscError

# indexer class -> the name of its rotary function in its modeling module (both take q, k, cos, sin, unsqueeze_dim)
KNOWN_INDEXERS = {
    "DeepseekV32Indexer": "apply_rotary_pos_emb",  # half-split rotary
    "GlmMoeDsaIndexer": "apply_rotary_pos_emb_interleave",
}


def _indexer_forward(self, hidden_states, q_resid, position_embeddings, attention_mask=None, position_ids=None,
                     cache=None):
    """The indexer's scores through msc::dsa_index: per head relu(q·k)·scale, weighted by weights_proj(x)·Hi^-½,
    summed over heads; the runtime masks each query's future and takes the top-k of its own sequence."""
    if cache is not None:
        raise MscError(f"{type(self).__name__} was given a transformers cache at capture; msc keeps its keys itself")
    b, t, _ = hidden_states.shape
    rope = getattr(sys.modules[type(self).__module__], KNOWN_INDEXERS[type(self).__name__])
    cos, sin = position_embeddings
    q = self.wq_b(q_resid).view(b, t, self.n_heads, self.head_dim)  # [1, T, Hi, D]
    q_rot, q_pass = torch.split(q, [self.qk_rope_head_dim, self.head_dim - self.qk_rope_head_dim], dim=-1)
    k = self.k_norm(self.wk(hidden_states)).unsqueeze(2)  # [1, T, 1, D]
    k_rot, k_pass = torch.split(k, [self.qk_rope_head_dim, self.head_dim - self.qk_rope_head_dim], dim=-1)
    q_rot, k_rot = rope(q_rot, k_rot, cos, sin, unsqueeze_dim=2)
    q = torch.cat([q_rot, q_pass], dim=-1)  # [1, T, Hi, D]
    k = torch.cat([k_rot, k_pass], dim=-1).squeeze(2)  # [1, T, D]
    weights = self.weights_proj(hidden_states.to(self.weights_proj.weight.dtype)).float() * self.n_heads ** -0.5
    return torch.ops.msc.dsa_index(q, k, weights, int(self.layer_idx), int(self.index_topk), float(self.softmax_scale))


def _placeholder_mask(module, args, kwargs):
    """Forward pre-hook of a DSA attention module: a [1, 1, 1, 1] mask where msc passes None (see module NOTE)."""
    hidden = args[0] if args else kwargs["hidden_states"]
    placeholder = torch.zeros(1, 1, 1, 1, dtype=torch.bool, device=hidden.device)
    if kwargs.get("attention_mask", 0) is None:
        kwargs = {**kwargs, "attention_mask": placeholder}
    elif len(args) > 2 and args[2] is None:
        args = (*args[:2], placeholder, *args[3:])
    return args, kwargs


def prepare_indexers(model: nn.Module) -> int:
    """Give every known indexer msc's forward and its attention module the placeholder mask; refuse an indexer of
    a class msc does not know. Returns how many were prepared."""
    n = 0
    for name, mod in model.named_modules():
        indexer = getattr(mod, "indexer", None)
        if not isinstance(indexer, nn.Module):
            continue
        cls = type(indexer).__name__
        if cls not in KNOWN_INDEXERS:
            raise MscError(f"{name}.indexer ({cls}) selects the tokens its attention sees (indexed sparse attention) in "
                           f"a way msc does not implement (known: {', '.join(KNOWN_INDEXERS)})")
        if not getattr(mod, "_msc_mla", False):
            raise MscError(f"{name} ({type(mod).__name__}) has a sparse-attention indexer but is not latent attention "
                           "(MLA); msc implements indexed sparse attention over MLA only")
        indexer.forward = _indexer_forward.__get__(indexer)
        mod.register_forward_pre_hook(_placeholder_mask, with_kwargs=True)
        mod._msc_dsa = True
        n += 1
    return n
