"""GPT-OSS: experts with biases, a clamped SwiGLU over interleaved gate/up columns stored transposed,
a router with a bias (top-k of the logits, then softmax over the k), attention sinks and alternating
sliding-window layers.

- Experts: `describe_experts` recognises `GptOssExperts._apply_gate` and passes
  act = `gpt_oss:ALPHA:LIMIT`, layout = `gate_up_t,down_t,interleaved` and both biases to msc::experts;
  the biases are sliced per expert node like the weights.
- Attention: the per-head sinks reach msc::attention through the interface's `s_aux` argument, and each
  layer's sliding window through `sliding_window`; the runtime's KV cache applies both.
"""
from __future__ import annotations

from msc.models.generic import GenericAdapter


class GptOssAdapter(GenericAdapter):
    model_types = ("gpt_oss",)
