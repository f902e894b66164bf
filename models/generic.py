"""The generic adapter: any transformers MoE family whose experts use transformers' experts interface.

Such a family needs no code of its own:
- attention goes through transformers' attention interface (msc registers `msc` there), so any
  attention whose core is softmax(QKᵀ)V — GQA, sliding windows, sinks — reaches `msc::attention` with the
  runtime's KV cache, and MLA (an `expand_kv` + `kv_b_proj` module) `msc::mla_attention` with a latent cache;
- the experts module (decorated with `use_experts_implementation`) is dispatched to `msc::experts`,
  with its activation, biases and storage order read from the module (`describe_experts`);
- the router is **not** replaced: its own code (softmax or sigmoid scores, correction bias, group-limited
  top-k, renormalisation, scaling) is captured as ordinary ops and runs on the attention side, so
  routing is exactly the family's.

NOTE: the shared experts and dense MLP layers of a family (Qwen2-MoE's gated shared expert,
DeepSeek-V3's shared experts and first dense layers) are ordinary modules in the captured graph and
therefore stay on the attention side (see the `annotate_roles` pass option `shared_experts`).

Checkpoints: a graph parameter is read under its own name when the checkpoint has it; otherwise through
transformers' own conversion mapping for the family (`models/hf_keys.py`): renamed tensors under their
on-disk names, stacked experts saved one expert at a time (`...experts.E.gate_proj.weight` / `up_proj` /
`down_proj`) stacked back on read, each expert node reading only its experts.
"""
from __future__ import annotations

import torch
from torch import nn

from msc.errors import MscError
from msc.models.base import FamilyAdapter
from msc.models.hf_keys import KeyIndex, build_key_index

_NUM_EXPERTS_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_TOP_K_KEYS = ("num_experts_per_tok", "moe_top_k", "top_k", "top_k_experts", "moe_topk")
_INTERMEDIATE_KEYS = ("moe_intermediate_size", "expert_intermediate_size", "intermediate_size", "ffn_hidden_size")


def first_attr(config, keys: tuple[str, ...], what: str):
    for k in keys:
        v = getattr(config, k, None)
        if v is not None:
            return v
    raise MscError(f"config of model_type '{config.model_type}' names no {what} (looked for {', '.join(keys)})")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers: the module list as long as config.num_hidden_layers, else the
    longest module list named like one (`layers`, `blocks`, `h`)."""
    n = getattr(model.config, "num_hidden_layers", None)
    lists = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod)]
    for _, mod in lists:
        if len(mod) == n:
            return mod
    named = [(len(mod), name, mod) for name, mod in lists if name.rsplit(".", 1)[-1] in ("layers", "blocks", "h")]
    if named:
        return max(named, key=lambda t: t[0])[2]
    raise MscError(f"cannot find the decoder layers of {type(model).__name__} (no module list of {n} layers)")


def _parameter_rows(config):
    """param name -> its size along dim 0 in the model of `config` (built on the meta device, once)."""
    shapes: dict = {}

    def rows(name: str) -> int:
        if not shapes:
            from msc.capture import build_meta_model

            shapes.update({n: tuple(p.shape) for n, p in build_meta_model(config, torch.float32).named_parameters()})
        if name not in shapes:
            raise MscError(f"the model has no parameter '{name}' to size a split checkpoint tensor by")
        return shapes[name][0]

    return rows


class GenericAdapter(FamilyAdapter):
    """Experts through transformers' experts interface, routers captured as they are."""

    model_types: tuple[str, ...] = ()
    experts_attr = "experts"

    def moe_blocks(self, model: nn.Module) -> list[tuple[int, nn.Module]]:
        out = []
        for i, layer in enumerate(decoder_layers(model)):
            for _, mod in layer.named_modules():
                if isinstance(getattr(mod, self.experts_attr, None), nn.Module):
                    out.append((i, mod))
                    break
        if not out:
            raise MscError(f"{type(model).__name__}: the generic adapter found no MoE block in its decoder layers (a module "
                           f"with an '{self.experts_attr}' child); this family needs an adapter of its own")
        return out

    def swap_router(self, block: nn.Module, layer: int) -> None:
        pass  # NOTE: the family's own routing code is captured; see the module docstring

    def moe_shape(self, config) -> dict[str, int]:
        return {
            "num_experts": int(first_attr(config, _NUM_EXPERTS_KEYS, "expert count")),
            "top_k": int(first_attr(config, _TOP_K_KEYS, "experts per token (top-k)")),
            "hidden_size": int(first_attr(config, ("hidden_size", "d_model"), "hidden size")),
            "intermediate_size": int(first_attr(config, _INTERMEDIATE_KEYS, "expert intermediate size")),
        }

    def checkpoint_source(self, param, keys, config, expert_rows):
        if keys is None or param in keys:
            return super().checkpoint_source(param, keys, config, expert_rows)
        index = self._key_index(config.model_type, keys)
        if index.split and index.rows_of is None:
            index.rows_of = _parameter_rows(config)
        src = index.source(param, expert_rows, self.moe_shape(config)["num_experts"])
        if src is not None:
            return src
        return super().checkpoint_source(param, keys, config, expert_rows)

    def _key_index(self, model_type: str, keys: set[str]) -> KeyIndex:
        # NOTE: one index per checkpoint key set (a compile asks for every parameter of the graph).
        cached = getattr(self, "_cached_index", None)
        if cached is None or cached[0] is not keys:
            cached = (keys, build_key_index(model_type, keys))
            self._cached_index = cached
        return cached[1]
