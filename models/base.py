"""What a family adapter knows, and the parts every transformers family shares.

A family adapter (1) makes a transformers model capturable: attention and experts go through the
`msc` implementations registered in transformers' attention and experts interfaces, and the router is
swapped for `msc::router`; (2) maps each parameter of the captured graph to the checkpoint tensors it
is made of, so a role reads only its own tensors (an expert node only its experts' rows).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from msc.errors import MscError

IMPL = "msc"


def _msc_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, **kwargs):
    """transformers attention interface -> msc::attention (the runtime owns the KV cache and the mask)."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    window = -1 if sliding_window is None else int(sliding_window)
    out = torch.ops.msc.attention(query, key, value, int(module.layer_idx), float(scaling), window)  # [1, T, nh, d]
    return out, None


def _no_mask(*args, **kwargs):
    # NOTE: msc::attention builds its causal (and sliding-window) mask per sequence from the runtime's
    # step layout, so the graph carries no mask tensor: the program stays valid for any packing.
    return None


def _msc_experts(self, hidden_states, top_k_index, top_k_weights):
    """transformers experts interface -> msc::experts (all experts of the layer, first id 0)."""
    return torch.ops.msc.experts(
        hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj, int(self._msc_layer), 0
    )


AttentionInterface.register(IMPL, _msc_attention)
AttentionMaskInterface.register(IMPL, _no_mask)
ALL_EXPERTS_FUNCTIONS.register(IMPL, _msc_experts)


class FamilyAdapter:
    """Base adapter; subclasses name their `model_type`s and how routers and checkpoint keys look."""

    model_types: tuple[str, ...] = ()

    # ------------------------------------------------------------------ capture
    def moe_blocks(self, model: nn.Module) -> list[tuple[int, nn.Module]]:
        """(layer index, MoE block) for every MoE layer; the block has `.gate` (router) and `.experts`."""
        raise NotImplementedError

    def swap_router(self, block: nn.Module, layer: int) -> None:
        raise NotImplementedError

    def prepare(self, model: nn.Module) -> int:
        """Route attention, routers and experts through msc ops; return the number of MoE layers."""
        blocks = self.moe_blocks(model)
        if not blocks:
            raise MscError(
                f"model {type(model).__name__} has no MoE layers (no router + experts block found): msc compiles "
                "Mixture-of-Experts models only"
            )
        for layer, block in blocks:
            block.experts._msc_layer = layer
            self.swap_router(block, layer)
        return len(blocks)

    def moe_shape(self, config) -> dict[str, int]:
        """num_experts, top_k, hidden_size, intermediate_size of the MoE layers."""
        raise NotImplementedError

    # ------------------------------------------------------------------ checkpoint
    def checkpoint_source(self, param: str, keys: set[str], config, expert_rows: tuple[int, int] | None) -> dict:
        """How to build graph parameter `param` from checkpoint tensors (see msc.checkpoint.WeightSource).

        expert_rows: for a stacked experts parameter [E, ...], only rows [start, stop) are wanted.
        """
        # keys None: no checkpoint yet (meta compile); assume the layout transformers saves.
        if keys is None or param in keys:
            src = {"key": param}
            if expert_rows is not None:
                src["rows"] = list(expert_rows)
            return src
        if param == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            return {"key": "model.embed_tokens.weight"}
        raise MscError(f"checkpoint has no tensor for parameter '{param}'")
