"""The runtime context that stateful msc ops (attention, dispatch/combine, expert_recv/send) call into.

A role worker installs one context for the duration of a forward; the ops find it with `current()`.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Protocol

from torch import Tensor


class RuntimeContext(Protocol):
    def attention(self, q: Tensor, k: Tensor, v: Tensor, layer: int, scaling: float, sliding_window: int,
                  sinks: Tensor | None = None) -> Tensor: ...
    def mla_attention(self, q: Tensor, latent: Tensor, k_rot: Tensor, kv_b: Tensor, layer: int, scaling: float,
                      sliding_window: int, nope_dim: int, v_head_dim: int, indices: Tensor | None = None) -> Tensor: ...
    def dsa_index(self, q: Tensor, k: Tensor, weights: Tensor, layer: int, topk: int, scale: float) -> Tensor: ...
    def causal_conv1d(self, x: Tensor, weight: Tensor, bias: Tensor | None, layer: int, index: int,
                      activation: str) -> Tensor: ...
    def gated_delta_rule(self, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, layer: int,
                         qk_l2norm: bool) -> Tensor: ...
    def mamba2_scan(self, x: Tensor, b: Tensor, c: Tensor, dt: Tensor, a_log: Tensor, d: Tensor, dt_bias: Tensor,
                    layer: int, heads: int, groups: int, dt_min: float, dt_max: float) -> Tensor: ...
    def mamba_scan(self, x: Tensor, dt: Tensor, b: Tensor, c: Tensor, gate: Tensor, a_log: Tensor, d: Tensor,
                   dt_bias: Tensor | None, layer: int) -> Tensor: ...
    def linear_attention(self, q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, layer: int) -> Tensor: ...
    def dispatch(self, hidden: Tensor, idx: Tensor, weights: Tensor, layer: int, bounds: list[int]) -> Tensor: ...
    def combine(self, ticket: Tensor, hidden: Tensor, layer: int) -> Tensor: ...
    def expert_recv(self, layer: int, hidden_size: int, top_k: int, dtype) -> tuple[Tensor, Tensor, Tensor]: ...
    def expert_send(self, hidden: Tensor, layer: int) -> None: ...


_local = threading.local()


def current() -> RuntimeContext:
    ctx = getattr(_local, "ctx", None)
    if ctx is None:
        raise RuntimeError("an msc op that needs a runtime (KV cache or peers) ran outside a role worker")
    return ctx


@contextlib.contextmanager
def use(ctx) -> Iterator[None]:
    prev = getattr(_local, "ctx", None)
    _local.ctx = ctx
    try:
        yield
    finally:
        _local.ctx = prev
