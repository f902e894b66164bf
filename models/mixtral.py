"""Mixtral: softmax top-k router, SiLU-gated experts stored on disk per expert (w1 gate, w3 up, w2 down)."""
from __future__ import annotations

import re

import torch
from torch import nn

from msc.errors import MscError
from msc.models.base import FamilyAdapter

_EXPERTS = re.compile(r"^(model\.layers\.\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_GATE = re.compile(r"^(model\.layers\.\d+)\.mlp\.gate\.weight$")


class MixtralAdapter(FamilyAdapter):
    model_types = ("mixtral",)

    def moe_blocks(self, model: nn.Module) -> list[tuple[int, nn.Module]]:
        return [(i, layer.mlp) for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]

    def swap_router(self, block: nn.Module, layer: int) -> None:
        gate = block.gate

        def forward(hidden_states: torch.Tensor):
            hidden_states = hidden_states.reshape(-1, gate.hidden_dim)  # [T, H]
            weights, index = torch.ops.msc.router(hidden_states, gate.weight, gate.top_k, layer)  # [T, K] each
            return None, weights, index

        gate.forward = forward

    def moe_shape(self, config) -> dict[str, int]:
        return {
            "num_experts": config.num_local_experts,
            "top_k": config.num_experts_per_tok,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
        }

    def checkpoint_source(self, param, keys, config, expert_rows):
        # transformers 5 keeps Mixtral experts fused in memory ([E, 2I, H], [E, H, I]) but saves them in the
        # original per-expert layout; read whichever the checkpoint has.
        if keys is not None and param in keys:
            return super().checkpoint_source(param, keys, config, expert_rows)
        m = _GATE.match(param)
        if m:
            return {"key": f"{m.group(1)}.block_sparse_moe.gate.weight"}
        m = _EXPERTS.match(param)
        if m:
            prefix, which = m.group(1), m.group(2)
            start, stop = expert_rows if expert_rows is not None else (0, config.num_local_experts)
            base = f"{prefix}.block_sparse_moe.experts"
            if which == "gate_up_proj":
                parts = [[f"{base}.{e}.w1.weight", f"{base}.{e}.w3.weight"] for e in range(start, stop)]
            else:
                parts = [[f"{base}.{e}.w2.weight"] for e in range(start, stop)]
            missing = [k for p in parts for k in p if keys is not None and k not in keys]
            if missing:
                raise MscError(f"checkpoint is missing {len(missing)} expert tensors for '{param}', e.g. '{missing[0]}'")
            return {"stack": parts}
        return super().checkpoint_source(param, keys, config, expert_rows)
