"""Which adapter serves which transformers `model_type`."""
from __future__ import annotations

from msc.errors import MscError
from msc.models.base import FamilyAdapter
from msc.models.dbrx import DbrxAdapter
from msc.models.deepseek_v3 import DeepseekV3Adapter
from msc.models.generic import GenericAdapter
from msc.models.gpt_oss import GptOssAdapter
from msc.models.mixtral import MixtralAdapter
from msc.models.qwen_moe import QwenMoeAdapter

_ADAPTERS: list[FamilyAdapter] = [MixtralAdapter(), QwenMoeAdapter(), DeepseekV3Adapter(), GptOssAdapter(), DbrxAdapter()]


def known_families() -> list[str]:
    return sorted(t for a in _ADAPTERS for t in a.model_types)


_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok")


def adapter_for(model_type: str, config=None) -> FamilyAdapter:
    """The family's own adapter, else the generic one for any MoE config (it fails at capture, naming the
    module and the reason, when the family's experts do not use transformers' experts interface)."""
    for a in _ADAPTERS:
        if model_type in a.model_types:
            return a
    if config is not None and not any(getattr(config, k, None) for k in _EXPERT_COUNT_KEYS):
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        if text is not config and any(getattr(text, k, None) for k in _EXPERT_COUNT_KEYS):
            raise MscError(
                f"model_type '{model_type}' is a composite (multimodal) model whose causal LM is not its text "
                f"model's class: msc compiles language models; use its text config (model_type "
                f"'{text.model_type}') instead"
            )
        raise MscError(
            f"model_type '{model_type}' has no MoE layers (its config names no experts): msc compiles "
            "Mixture-of-Experts models only"
        )
    if config is None:
        raise MscError(f"no msc adapter for model_type '{model_type}' (known families: {', '.join(known_families())})")
    return GenericAdapter()
