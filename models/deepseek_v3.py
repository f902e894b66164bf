"""DeepSeek-V3: multi-head latent attention, sigmoid router with a correction bias and group-limited
top-k, shared experts, and dense first layers.

- MLA: transformers expands the latent K/V to full heads before the attention interface, so
  `msc::attention` sees ordinary q, k [.., qk_nope + qk_rope] and v [.., v_head_dim] (a narrower value
  width than the keys, which msc::attention supports). The KV cache therefore stores expanded heads, not
  the compressed latent: correct, but larger than DeepSeek's own cache.
- Router (`DeepseekV3TopkRouter`): captured as is (sigmoid scores, `e_score_correction_bias` from the
  checkpoint, n_group / topk_group masking, normalisation and `routed_scaling_factor`).
- Shared experts and the first `first_k_dense_replace` dense layers stay on the attention side.
"""
from __future__ import annotations

from msc.models.generic import GenericAdapter


class DeepseekV3Adapter(GenericAdapter):
    model_types = ("deepseek_v3",)
