"""Model-family adapters: how to make a transformers MoE family capturable and where its weights live."""
from msc.models.registry import adapter_for, known_families  # noqa: F401
