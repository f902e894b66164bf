"""Checks of a model's transformers config before anything is built from it.

A spec's `model.config` is a `model_type` plus overrides handed to transformers. transformers checks the
types of the fields it knows, but accepts negative or zero sizes, a top-k larger than the expert count or
head counts that do not divide, and the model then fails deep inside capture or, worse, in a role process
(an index error blamed on a dead peer). `build_config` turns whatever transformers raises into one line
naming the key; `check_config` refuses the impossible shapes with one line each, before any capture.
"""
from __future__ import annotations

import re
from typing import Any

from msc.errors import MscError

# Sizes that must be positive integers, and counts that may be zero, where a config has them (canonical
# transformers names; a family's own name for one, e.g. DBRX's d_model, is found through its attribute_map).
_POSITIVE = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
             "decoder_sparse_step", "n_group", "topk_group", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim",
             "qk_nope_head_dim", "v_head_dim")
_NON_NEGATIVE = ("shared_expert_intermediate_size", "n_shared_experts", "first_k_dense_replace")
# DBRX keeps its attention and MLP sizes in sub-configs.
_DBRX_POSITIVE = ("ffn_config.ffn_hidden_size", "attn_config.kv_n_heads")

_MAX_OVERRIDES_TO_BISECT = 64  # per-key attribution of an error rebuilds the config once per key


def _int_like(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _get(config, dotted: str) -> Any:
    obj = config
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _name(config, key: str) -> str:
    """The key as the config names it: DBRX's `hidden_size` is `d_model` in its config.json."""
    return getattr(config, "attribute_map", {}).get(key, key)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _transformers_error(e: BaseException) -> str:
    """The useful line of a transformers error, cut short: a strict-dataclass error puts it last, after a header."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return " ".join(lines[-1].split())[:200] if lines else type(e).__name__


def build_config(model_type: Any, overrides: dict[str, Any]):
    """AutoConfig.for_model(model_type, **overrides); MscError (one line naming the key when it can be told)
    for anything transformers raises."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not isinstance(model_type, str) or not model_type:
        raise MscError(f"model.config.model_type: expected a transformers model type name such as mixtral, "
                       f"got {_short(model_type)}")
    if model_type not in CONFIG_MAPPING:
        raise MscError(f"model.config.model_type: transformers knows no model type {_short(model_type)} "
                       "(for example: mixtral, qwen3_moe, deepseek_v3, dbrx, gpt_oss)")
    cls = CONFIG_MAPPING[model_type]
    for key in overrides:
        if not key.isidentifier() or key.startswith("_"):
            raise MscError(f"model.config: key {_short(key)} is not a config setting (expected a name such as hidden_size)")
        if key == "model_type":
            continue
        # NOTE: methods only: a property (torch_dtype) is a setting with a setter and stays allowed
        if callable(getattr(cls, key, None)):
            raise MscError(f"model.config.{key}: not a setting of {cls.__name__} (it names one of its methods)")
    rest = {k: v for k, v in overrides.items() if k != "model_type"}
    _check_sizes(lambda key: _get_override(rest, key), lambda key: key)  # before transformers warns about them
    # NOTE: any exception: a config's __init__ raises whatever its code trips on (TypeError, AttributeError,
    # KeyError, huggingface_hub's StrictDataclassFieldValidationError, ...) for a value of the wrong shape.
    try:
        return AutoConfig.for_model(model_type, **rest)
    except Exception as e:  # noqa: BLE001
        raise MscError(_explain(model_type, rest, e)) from None


def _explain(model_type: str, overrides: dict[str, Any], e: Exception) -> str:
    """One line for the config error `e`: the key named in the message, else the first override that fails
    on its own, else the message."""
    from transformers import AutoConfig

    named = re.search(r"[Ff]ield '([A-Za-z_][A-Za-z0-9_]*)'", str(e))
    if named:
        return f"model.config.{named.group(1)}: transformers rejected it: {_transformers_error(e)}"
    if len(overrides) <= _MAX_OVERRIDES_TO_BISECT:
        for key, value in overrides.items():
            try:
                AutoConfig.for_model(model_type, **{key: value})
            except Exception as alone:  # noqa: BLE001
                return f"model.config.{key}: transformers rejected {_short(value)}: {_transformers_error(alone)}"
    return f"model.config: transformers cannot build a {model_type} config from it: {_transformers_error(e)}"


def _moe_keys(config) -> tuple[str | None, str | None]:
    """The attributes holding the expert count and top-k: those the family adapters read (models/dbrx.py,
    models/generic.py's lookup order, which Mixtral, Qwen-MoE, DeepSeek and GPT-OSS configs all answer)."""
    from msc.models.generic import _NUM_EXPERTS_KEYS, _TOP_K_KEYS

    if getattr(config, "ffn_config", None) is not None and hasattr(config.ffn_config, "moe_num_experts"):
        return "ffn_config.moe_num_experts", "ffn_config.moe_top_k"
    experts = next((k for k in _NUM_EXPERTS_KEYS if getattr(config, k, None) is not None), None)
    top_k = next((k for k in _TOP_K_KEYS if getattr(config, k, None) is not None), None)
    return experts, top_k


def _get_override(overrides: dict[str, Any], dotted: str) -> Any:
    obj: Any = overrides
    for part in dotted.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def _check_sizes(get, name) -> None:
    """Every size `get(key)` answers (None: absent) is an integer at least its minimum; `name(key)` is how the
    message names it."""
    sizes = [(k, 1) for k in _POSITIVE] + [(k, 0) for k in _NON_NEGATIVE] + [(k, 1) for k in _DBRX_POSITIVE]
    for key, least in sizes:
        value = get(key)
        if value is None:
            continue
        if not _int_like(value) or value < least:
            expected = "a positive integer" if least else "a non-negative integer"
            raise MscError(f"model.config.{name(key)}: expected {expected}, got {_short(value)}")


def _check_uniform_layers(config, where: str) -> None:
    """Refuse a heterogeneous config (transformers' `per_layer_config`: layers with their own head counts or
    widths), naming the fields that vary and the layers that differ."""
    try:
        heterogeneous = bool(getattr(config, "is_heterogeneous", False))
        fields = sorted(config.per_layer_attributes or ()) if heterogeneous else []
    except Exception:  # not transformers' HeterogeneousConfigMixin
        return
    if not fields:
        return
    layers = config.per_layer_config
    differ = []
    for field in fields:
        values = [getattr(layers[i], field, None) for i in range(len(layers))]
        if len(set(map(repr, values))) > 1:
            first = values[0]
            odd = [i for i, v in enumerate(values) if v != first]
            differ.append(f"{field} ({first!r} at layer 0, {values[odd[0]]!r} at layer{'s' if len(odd) > 1 else ''} "
                          f"{', '.join(map(str, odd[:6]))}{', ...' if len(odd) > 6 else ''})")
    if not differ:  # every layer has the same values: the global reads are unambiguous
        config.allow_global_per_layer_attribute_access = True
        return
    # NOTE: msc sizes attention, its paged KV cache and the planner's memory model once per model; layers of
    # their own widths (Gemma 4's global layers, dots3's sliding MLA layers) would need per-layer caches.
    # A refusal names the piece instead of compiling a program with the wrong widths.
    raise MscError(f"{where}: layers of different shapes (per_layer_config) are not implemented: "
                   + "; ".join(differ)
                   + ". msc expects every layer's attention to have the same heads and widths")


def check_config(config) -> None:
    """Refuse, with one line naming the key, a config msc cannot build a working model from: non-positive
    sizes, zero experts, top-k above the expert count, head counts that do not divide, layers of different
    shapes."""
    where = "model.config"
    _check_uniform_layers(config, where)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is not config:  # a composite (vision-language) config: its language model's layers
        _check_uniform_layers(text, where + ".text_config")
    _check_sizes(lambda key: _get(config, key), lambda key: _name(config, key))

    experts_key, top_k_key = _moe_keys(config)
    experts = _get(config, experts_key) if experts_key else None
    top_k = _get(config, top_k_key) if top_k_key else None
    if experts is not None and (not _int_like(experts) or experts < 1):
        raise MscError(f"{where}.{_name(config, experts_key)}: an MoE model needs at least 1 expert, got {_short(experts)}")
    if top_k is not None and (not _int_like(top_k) or top_k < 1):
        raise MscError(f"{where}.{_name(config, top_k_key)}: each token needs at least 1 expert (top-k), got {_short(top_k)}")
    if experts is not None and top_k is not None and top_k > experts:
        raise MscError(f"{where}.{_name(config, top_k_key)}: top-k {top_k} is larger than the expert count "
                       f"{experts} ({_name(config, experts_key)}); each token picks at most every expert")

    n_group, topk_group = getattr(config, "n_group", None), getattr(config, "topk_group", None)
    if experts is not None and n_group is not None:
        # group-limited routing (DeepSeek-V3, GLM-4-MoE) views the experts as [n_group, experts / n_group] and
        # scores each group by its best two experts
        if experts % n_group or experts // n_group < 2:
            raise MscError(f"{where}.n_group: {experts} experts do not split into {n_group} groups of at least 2 "
                           f"({_name(config, experts_key)} must be a multiple of n_group, at least twice it)")
        if topk_group is not None and topk_group > n_group:
            raise MscError(f"{where}.topk_group: {topk_group} groups picked of {n_group} (n_group); expected at most n_group")

    hidden, heads = _get(config, "hidden_size"), _get(config, "num_attention_heads")
    head_dim = getattr(config, "head_dim", None)
    # NOTE: with no explicit head_dim the families derive it as hidden_size // heads, so a remainder is a
    # mistake (weights of a width no checkpoint has); families with their own head_dim (Qwen3, GPT-OSS,
    # DeepSeek's MLA) need no such relation.
    if hidden is not None and heads is not None and head_dim is None and hidden % heads:
        raise MscError(f"{where}.{_name(config, 'hidden_size')}: {hidden} is not divisible by the {heads} attention "
                       f"heads ({_name(config, 'num_attention_heads')}); set head_dim or make it a multiple")
    kv_key = "attn_config.kv_n_heads" if _get(config, "attn_config.kv_n_heads") is not None else "num_key_value_heads"
    kv = _get(config, kv_key)
    # NOTE: MLA (DeepSeek: kv_lora_rank set) expands keys and values to every head; no grouping to divide.
    if heads is not None and kv is not None and getattr(config, "kv_lora_rank", None) is None and heads % kv:
        raise MscError(f"{where}.{_name(config, kv_key)}: {kv} key/value heads do not divide the {heads} attention "
                       f"heads ({_name(config, 'num_attention_heads')}); expected a divisor of it")
