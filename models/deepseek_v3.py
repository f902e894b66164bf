"""DeepSeek-V3: multi-head latent attention, sigmoid router with a correction bias and group-limited
top-k, shared experts, and dense first layers.

- MLA: `expand_kv` is swapped for a hand-over of the latent and rotary key (models/base.py::prepare_mla),
  so attention is `msc::mla_attention` and the KV cache keeps kv_lora_rank + qk_rope_head_dim values a
  token, as DeepSeek's own cache does (not the expanded heads, 71x more for the full model).
- Router (`DeepseekV3TopkRouter`): captured as is (sigmoid scores, `e_score_correction_bias` from the
  checkpoint, n_group / topk_group masking, normalisation and `routed_scaling_factor`).
- Shared experts and the first `first_k_dense_replace` dense layers stay on the attention side.
"""
from __future__ import annotations

from msc.models.generic import GenericAdapter


class DeepseekV3Adapter(GenericAdapter):
    model_types = ("deepseek_v3",)
