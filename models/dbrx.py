"""DBRX: fused QKV attention with clipping, softmax top-k router with p-norm renormalisation, and experts
stored flattened: `ffn.experts.mlp.{w1, v1, w2}` each [E·I, H] (gate, up, and down transposed).

DBRX's experts do not use transformers' experts interface, so this adapter gives each experts module the
stacked parameters msc::experts takes — gate_up [E, 2I, H] and down [E, I, H] (layout `down_t`) — and
routes its forward through msc::experts. The checkpoint keeps DBRX's layout: gate_up rows of expert e are
read as rows [e·I, (e+1)·I) of w1 and of v1, down rows as rows of w2, so an expert node reads only its
experts' rows. The router and the attention are captured as they are (the attention through
transformers' attention interface).
"""
from __future__ import annotations

import re

import torch
from torch import nn

from msc.errors import MscError
from msc.models.base import FamilyAdapter

_STACKED = re.compile(r"^(?P<prefix>transformer\.blocks\.\d+\.ffn\.experts)\.(?P<which>gate_up_proj|down_proj)$")


class DbrxAdapter(FamilyAdapter):
    model_types = ("dbrx",)

    def moe_blocks(self, model: nn.Module) -> list[tuple[int, nn.Module]]:
        return [(i, block.ffn) for i, block in enumerate(model.transformer.blocks)]

    def swap_router(self, block: nn.Module, layer: int) -> None:
        pass  # DbrxRouter and DbrxFFN.route_tokens_to_experts are captured as they are

    def prepare(self, model: nn.Module) -> int:
        ffn_config = model.config.ffn_config
        act = (ffn_config.ffn_act_fn or {}).get("name", "silu")
        blocks = self.moe_blocks(model)
        for layer, block in blocks:
            self._restack(block.experts, layer, act)
        return len(blocks)

    @staticmethod
    def _restack(experts: nn.Module, layer: int, act: str) -> None:
        e, i, h = experts.num_experts, experts.ffn_hidden_size, experts.hidden_size
        w1 = experts.mlp.w1
        experts.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h, dtype=w1.dtype, device=w1.device), requires_grad=False)
        experts.down_proj = nn.Parameter(torch.empty(e, i, h, dtype=w1.dtype, device=w1.device), requires_grad=False)
        del experts.mlp  # its flattened tensors are read from the checkpoint into the stacked ones above

        def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
            batch = hidden_states.shape[0]
            x = hidden_states.reshape(-1, h)  # [T, H]
            y = torch.ops.msc.experts(x, top_k_index, top_k_weights, experts.gate_up_proj, experts.down_proj, layer, 0,
                                      None, None, act, "down_t")  # [T, H]
            return y.view(batch, -1, h)

        experts.forward = forward

    def moe_shape(self, config) -> dict[str, int]:
        f = config.ffn_config
        return {"num_experts": f.moe_num_experts, "top_k": f.moe_top_k, "hidden_size": config.d_model,
                "intermediate_size": f.ffn_hidden_size}

    def checkpoint_source(self, param, keys, config, expert_rows):
        m = _STACKED.match(param)
        if m is None:
            return super().checkpoint_source(param, keys, config, expert_rows)
        f = config.ffn_config
        n, inter = f.moe_num_experts, f.ffn_hidden_size
        start, stop = expert_rows if expert_rows is not None else (0, n)
        base = f"{m.group('prefix')}.mlp"
        names = ["w1", "v1"] if m.group("which") == "gate_up_proj" else ["w2"]
        if keys is not None:
            missing = [f"{base}.{nm}" for nm in names if f"{base}.{nm}" not in keys]
            if missing:
                raise MscError(f"checkpoint has no tensor '{missing[0]}' for DBRX parameter '{param}'")
        rows = lambda e: [e * inter, (e + 1) * inter]  # noqa: E731  (expert e's rows of a flattened [E*I, H] tensor)
        return {"stack": [[{"key": f"{base}.{nm}", "rows": rows(e)} for nm in names] for e in range(start, stop)]}
