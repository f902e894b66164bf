"""Which adapter serves which transformers `model_type`."""
from __future__ import annotations

from msc.errors import MscError
from msc.models.base import FamilyAdapter
from msc.models.mixtral import MixtralAdapter

_ADAPTERS: list[FamilyAdapter] = [MixtralAdapter()]


def known_families() -> list[str]:
    return sorted(t for a in _ADAPTERS for t in a.model_types)


def adapter_for(model_type: str) -> FamilyAdapter:
    for a in _ADAPTERS:
        if model_type in a.model_types:
            return a
    raise MscError(
        f"no msc adapter for model_type '{model_type}' (known families: {', '.join(known_families())})"
    )
