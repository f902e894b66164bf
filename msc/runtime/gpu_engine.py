"""Colocated execution in one process: attention, router and experts of a captured program, on the engine.

`ColocatedEngine` is a thin wrapper that keeps the interface the benchmarks and `msc profile` use
(generate a batch of prompts for exactly N new tokens, time synthetic decode steps) over the one engine
(msc.engine): paged KV cache, the Triton decode-attention and fused MoE kernels on CUDA, and decode steps
replayed from CUDA graphs per batch bucket (msc.engine.runner).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from msc.engine.engine import Engine
from msc.engine.request import SamplingParams
from msc.engine.runner import ModelRunner
from msc.errors import MscError


@dataclass
class GenerateResult:
    tokens: list[list[int]]  # new tokens per prompt
    prefill_s: float  # seconds of the steps that fed prompt tokens
    step_s: list[float] = field(default_factory=list)  # decode-only steps (wall clock, host sync included)

    @property
    def median_step_s(self) -> float:
        s = sorted(self.step_s)
        return s[len(s) // 2] if s else float("nan")


class ColocatedEngine:
    """A colocated program (a GraphModule with weights on the device) on the engine; see the module docstring.

    gm(input_ids [1, T], position_ids [1, T]) -> logits [1, T, V]. max_batch / max_seq_len size the KV pool
    (max_batch sequences of max_seq_len tokens); prefill_tokens is the engine's token budget per step."""

    def __init__(self, gm: fx.GraphModule, num_layers: int, device: str | torch.device = "cuda", *, max_batch: int = 256,
                 max_seq_len: int = 2048, page_size: int = 16, cuda_graphs: bool = True, prefill_tokens: int = 16384,
                 eos_token_ids=(), prefix_caching: bool = False):
        self.runner = ModelRunner(gm, num_layers, device, cuda_graphs=cuda_graphs, max_batch=max_batch)
        # NOTE: prefix caching off by default here: this wrapper times steps (benchmarks, msc profile), which
        # run the same prompts again and must compute them again
        self.engine = Engine(self.runner, eos_token_ids, max_batch=max_batch, max_step_tokens=prefill_tokens,
                             max_seq_len=max_seq_len, kv_tokens=max_batch * max_seq_len, page_size=page_size,
                             prefix_caching=prefix_caching)
        self.max_batch, self.max_seq_len = max_batch, max_seq_len

    @property
    def cache(self):
        return self.runner.cache

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> GenerateResult:
        """Greedy generation of exactly max_new_tokens per prompt (end-of-sequence tokens do not stop it)."""
        if not prompts or max_new_tokens <= 0:
            raise MscError("generate: give at least one prompt and max_new_tokens >= 1")
        if len(prompts) > self.max_batch:
            raise MscError(f"generate: {len(prompts)} prompts, but the engine holds at most max_batch={self.max_batch}")
        longest = max(len(p) for p in prompts) + max_new_tokens
        if longest > self.max_seq_len:
            raise MscError(f"generate: a sequence reaches {longest} tokens; the engine was made for max_seq_len={self.max_seq_len}")
        first = self.engine.step_no
        reqs = self.engine.generate(prompts, SamplingParams(max_tokens=max_new_tokens, ignore_eos=True))
        recs = [r for r in self.engine.records if r.step >= first and r.tokens]
        return GenerateResult([r.output for r in reqs], sum(r.seconds for r in recs if r.prefill),
                              [r.seconds for r in recs if not r.prefill])

    def time_decode(self, batch: int, context: int, steps: int = 20, warmup: int = 3) -> float:
        """Median seconds of one decode step of `batch` sequences at `context` tokens each (synthetic)."""
        return self.runner.time_decode(batch, context, steps, warmup)
