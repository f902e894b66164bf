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


# Keyword arguments of transformers' attention interface that msc::attention can ignore: the runtime owns
# the KV cache, the step's packing and the causal mask, so these carry nothing it needs.
def _per_call_kwargs() -> set[str]:
    """The generic per-call flags transformers threads through every layer (TransformersKwargs)."""
    from transformers.utils.generic import TransformersKwargs

    return {k for c in TransformersKwargs.__mro__ for k in getattr(c, "__annotations__", {})}


_BENIGN_KWARGS = frozenset({
    "position_ids", "cache_position", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
    "output_attentions", "output_hidden_states", "output_router_logits", "use_cache", "past_key_values",
    "past_key_value", "return_dict", "deterministic", "num_items_in_batch", "seq_idx", "s_aux", "softcap",
} | _per_call_kwargs())


def _msc_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, **kwargs):
    """transformers attention interface -> msc::attention (the runtime owns the KV cache and the mask).

    NOTE: any other argument with a value (a position bias, sparse-attention indices, sinks under another
    name, non-causal attention) is refused at compile time, naming it: ignored, it would compile into a
    program that computes something else."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if kwargs.get("softcap") is not None:
        raise MscError(f"{type(module).__name__} uses attention logit soft-capping, which msc::attention does not implement yet")
    if kwargs.get("is_causal", True) is False:
        raise MscError(f"{type(module).__name__} asks for non-causal attention (is_causal=False), which msc::attention "
                       "does not implement (it attends causally per sequence)")
    indices = kwargs.pop("indices", None) if getattr(module, "_msc_dsa", False) else None  # msc::dsa_index's picks
    unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in _BENIGN_KWARGS | {"is_causal"})
    if unknown:
        raise MscError(f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) passes attention "
                       f"argument(s) {', '.join(unknown)} that msc::attention does not apply; refusing rather than "
                       "compiling a program that computes something else")
    window = -1 if sliding_window is None else int(sliding_window)
    if getattr(module, "_msc_mla", False):
        return _mla_attention(module, query, key, value, float(scaling), window, indices), None
    sinks = kwargs.get("s_aux")  # [nh] per-head sink logits (GPT-OSS)
    out = torch.ops.msc.attention(query, key, value, int(module.layer_idx), float(scaling), window, sinks)  # [1, T, nh, dv]
    return out, None


# ---------------------------------------------------------------- multi-head latent attention (MLA)
# NOTE: transformers' MLA families (DeepSeek-V2/V3, GLM-4-MoE-Lite, LongCat, Mistral 4, ...) share one shape:
# the normalised latent and the rotary key go through `expand_kv` (kv_b_proj per head) straight into the
# attention interface. msc swaps `expand_kv` per module for a hand-over of the unexpanded pair, so that
# msc::mla_attention receives the latent and caches it (r + dr values a token instead of nh·(dk + dv)). The
# attention interface checks it got exactly that pair back; anything done to the expanded keys or values
# in between would be lost, so it is refused.
def is_mla(module: nn.Module) -> bool:
    """An attention module of transformers' MLA shape: an `expand_kv` method and a `kv_b_proj` projection."""
    return callable(getattr(type(module), "expand_kv", None)) and isinstance(getattr(module, "kv_b_proj", None), nn.Module)


def _hand_over_latent(self, latent, k_rot):
    """msc's `expand_kv` of an MLA module: no expansion; the latent [1, 1, T, r] and rotary key [1, 1, T, dr]
    go on to msc::mla_attention as they are (see _mla_attention)."""
    self._msc_mla_pair = (latent, k_rot)
    return latent, k_rot


def prepare_mla(module: nn.Module, where: str) -> None:
    """Route an MLA module's attention through msc::mla_attention (latent cache); MscError naming `where`
    when its latent projection is one msc does not absorb."""
    kv_b = module.kv_b_proj
    if type(kv_b) is not nn.Linear or kv_b.bias is not None:
        raise MscError(f"{where}.kv_b_proj ({type(kv_b).__name__}{', with a bias' if getattr(kv_b, 'bias', None) is not None else ''}) "
                       "is not a plain bias-free linear: msc's latent attention cannot absorb it")
    for attr in ("qk_nope_head_dim", "v_head_dim", "kv_lora_rank"):
        if not isinstance(getattr(module, attr, None), int):
            raise MscError(f"{where} ({type(module).__name__}) has no integer '{attr}'; msc reads MLA's widths from it")
    if kv_b.in_features != module.kv_lora_rank or kv_b.out_features % (module.qk_nope_head_dim + module.v_head_dim):
        raise MscError(f"{where}.kv_b_proj is [{kv_b.out_features}, {kv_b.in_features}]; expected [heads x "
                       f"({module.qk_nope_head_dim} + {module.v_head_dim}), {module.kv_lora_rank}]")
    module.expand_kv = _hand_over_latent.__get__(module)
    module._msc_mla = True


def _mla_attention(module, query, key, value, scaling: float, window: int, indices=None):
    """query [1, nh, T, dn + dr] and the pair handed over by _hand_over_latent -> msc::mla_attention."""
    pair = getattr(module, "_msc_mla_pair", None)
    module._msc_mla_pair = None
    if pair is None or key is not pair[0] or value is not pair[1]:
        raise MscError(f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) changes the keys or values "
                       "between expand_kv and attention; msc's latent attention would not compute what it computes")
    dn, dv = module.qk_nope_head_dim, module.v_head_dim
    if query.shape[-1] != dn + value.shape[-1]:
        raise MscError(f"{type(module).__name__}: query width {query.shape[-1]} is not qk_nope_head_dim {dn} + the "
                       f"rotary key's {value.shape[-1]}")
    out = torch.ops.msc.mla_attention(query, key, value, module.kv_b_proj.weight, int(module.layer_idx), scaling,
                                      window, dn, dv, indices)  # [1, T, nh, dv]
    return out


def _no_mask(*args, **kwargs):
    # NOTE: msc::attention builds its causal (and sliding-window) mask per sequence from the runtime's
    # step layout, so the graph carries no mask tensor: the program stays valid for any packing.
    return None


def _msc_experts(self, hidden_states, top_k_index, top_k_weights):
    """transformers experts interface -> msc::experts (all experts of the layer, first id 0)."""
    has_bias = getattr(self, "has_bias", False)
    first = "gate_up_proj" if getattr(self, "has_gate", True) else "up_proj"  # up-only experts: layout up_only
    return torch.ops.msc.experts(
        hidden_states, top_k_index, top_k_weights, getattr(self, first), self.down_proj, int(self._msc_layer), 0,
        getattr(self, f"{first}_bias") if has_bias else None, self.down_proj_bias if has_bias else None,
        getattr(self, "_msc_act", "silu"), getattr(self, "_msc_layout", ""),
    )


def _gpt_oss_gate(module) -> tuple[str, list[str]]:
    return f"gpt_oss:{float(module.alpha)!r}:{float(module.limit)!r}", ["interleaved"]


# NOTE: an experts class that overrides transformers' `_apply_gate` computes its own activation; msc
# recognises the ones it has an implementation for (by qualified name) and refuses the others by name,
# rather than silently computing something else.
KNOWN_GATES = {"GptOssExperts._apply_gate": _gpt_oss_gate}


def describe_experts(experts: nn.Module, where: str) -> tuple[str, str]:
    """(act, layout) of msc::experts for an experts module using transformers' experts interface; MscError
    naming the module `where` and the reason when msc cannot compute what it computes."""
    from transformers.integrations.moe import _default_apply_gate

    cls = type(experts).__name__
    if not hasattr(experts, "has_gate"):
        raise MscError(f"{where} ({cls}) does not use transformers' experts interface (use_experts_implementation): "
                       "msc cannot see its weights; write a family adapter for it")
    if getattr(experts, "has_post_expert_norm", False):
        raise MscError(f"{where} ({cls}) normalises each expert's output, which msc does not implement yet")
    if not experts.has_gate:
        return _describe_up_only(experts, where)
    for name in ("gate_up_proj", "down_proj"):
        if not isinstance(getattr(experts, name, None), torch.Tensor):
            raise MscError(f"{where} ({cls}) has no '{name}' parameter; msc expects stacked [E, ...] expert weights")
    layout = []
    if experts.is_transposed:
        layout += ["gate_up_t", "down_t"]
    gate = type(experts)._apply_gate
    if gate is _default_apply_gate:
        act = getattr(getattr(experts, "config", None), "hidden_act", None)
        if not isinstance(act, str):  # another field (Gemma 4's hidden_activation): named by the module's act_fn
            act = _act_fn_name(experts)
        if not isinstance(act, str):
            raise MscError(f"{where} ({cls}): cannot tell its activation (config.hidden_act is {act!r})")
        if not experts.is_concatenated:
            raise MscError(f"{where} ({cls}) stores gate and up interleaved but uses the default gate, which splits them in halves")
    else:
        known = KNOWN_GATES.get(gate.__qualname__)
        if known is None:
            raise MscError(f"{where} ({cls}) computes its own gate activation ({gate.__qualname__}), which msc does not "
                           f"implement (known: {', '.join(KNOWN_GATES)})")
        act, extra = known(experts)
        layout += extra
    from msc.backends.compute.torch_eager import parse_activation

    parse_activation(act)  # an unknown activation name fails here, at compile time, naming it
    return act, ",".join(layout)


def _act_fn_name(experts: nn.Module) -> str | None:
    """The activation name of transformers' table whose class the module's act_fn is (None: no act_fn or not in
    the table, or no name of it that msc implements)."""
    from transformers.activations import ACT2CLS

    from msc.backends.compute.torch_eager import _ACTIVATIONS

    act_cls = type(getattr(experts, "act_fn", None))
    names = [k for k, v in ACT2CLS.items() if (v[0] if isinstance(v, tuple) else v) is act_cls and k in _ACTIVATIONS]
    return names[0] if names else None


def _describe_up_only(experts: nn.Module, where: str) -> tuple[str, str]:
    """(act, layout) of experts without a gate projection (Nemotron-H): act(up(x)) then down, the activation
    named by matching the module's act_fn against transformers' activation table."""
    cls = type(experts).__name__
    for name in ("up_proj", "down_proj"):
        if not isinstance(getattr(experts, name, None), torch.Tensor):
            raise MscError(f"{where} ({cls}) has no '{name}' parameter; msc expects stacked [E, ...] expert weights")
    layout = "up_only,gate_up_t,down_t" if experts.is_transposed else "up_only"
    act = _act_fn_name(experts)
    if act is None:
        raise MscError(f"{where} ({cls}): up-only experts with activation {type(getattr(experts, 'act_fn', None)).__name__}, "
                       "which msc does not implement")
    return act, layout


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
        paths = {id(m): name for name, m in model.named_modules()}
        for name, mod in model.named_modules():
            if is_mla(mod):
                prepare_mla(mod, name)
        from msc.models.sparse_attention import prepare_indexers

        prepare_indexers(model)
        for layer, block in blocks:
            where = paths.get(id(block.experts), f"layer {layer} experts")
            block.experts._msc_act, block.experts._msc_layout = describe_experts(block.experts, where)
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
            # the embedding's own source (Param2MoE saves it renamed, as model.word_embeddings.weight)
            return self.checkpoint_source("model.embed_tokens.weight", keys, config, expert_rows)
        raise MscError(f"checkpoint has no tensor for parameter '{param}'")
