"""Qwen2-MoE and Qwen3-MoE: softmax top-k routers (renormalised or not, `norm_topk_prob`), SiLU experts.

Qwen2-MoE adds a shared expert with its own sigmoid gate to every MoE layer; it is an ordinary MLP in the
captured graph and runs on the attention side (the `shared_experts` rule of annotate_roles). Layers listed
in `mlp_only_layers` (or off the `decoder_sparse_step`) are dense and stay on the attention side too.
Everything else is the generic adapter: transformers' experts interface, checkpoint experts saved one
expert at a time (gate_proj / up_proj / down_proj).
"""
from __future__ import annotations

from msc.models.generic import GenericAdapter


class QwenMoeAdapter(GenericAdapter):
    model_types = ("qwen2_moe", "qwen3_moe")
