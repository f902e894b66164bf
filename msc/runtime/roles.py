"""What each role process does with its program: the attention replica generates, an expert node serves."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import Tensor

from msc.runtime import context
from msc.runtime.kv_cache import KVCache, StepLayout, cached_attention


class AttentionRole:
    """Runs the attention program: prefill + greedy decode with a KV cache, experts reached via `comm`."""

    def __init__(self, program: fx.GraphModule, comm, num_layers: int, eos_token_id, batch_size: int, device="cpu"):
        self.program, self.comm, self.num_layers = program, comm, num_layers
        eos = eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
        self.eos = {e for e in eos if e is not None}
        self.batch_size, self.device = batch_size, torch.device(device)
        self.cache: KVCache | None = None
        self.layout: StepLayout | None = None
        self.forwards = 0
        self.on_forward = None  # fault-injection hook for tests

    # ------------------------------------------------------------------ RuntimeContext
    def attention(self, q, k, v, layer, scaling, sliding_window):
        return cached_attention(self.cache, self.layout, q, k, v, layer, scaling, sliding_window)

    def dispatch(self, hidden, idx, weights, layer, bounds):
        return self.comm.dispatch(hidden, idx, weights, layer, bounds)

    def combine(self, ticket, hidden, layer):
        return self.comm.combine(ticket, hidden, layer)

    # ------------------------------------------------------------------ generation
    def _forward(self, ids: list[int], positions: list[int], layout: StepLayout) -> Tensor:
        self.layout = layout
        self.comm.begin_forward()
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)  # [1, T]
        position_ids = torch.tensor([positions], dtype=torch.long, device=self.device)  # [1, T]
        with context.use(self), torch.no_grad():
            out = self.program(input_ids, position_ids)
        logits = out[0] if isinstance(out, (tuple, list)) else out  # [1, T, V]
        self.forwards += 1
        if self.on_forward is not None:
            self.on_forward(self.forwards)
        ends = torch.tensor(layout.starts) + torch.tensor(layout.lengths) - 1
        return logits[0, ends].float()  # [B, V] logits of each sequence's last token

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> tuple[list[list[int]], list[Tensor]]:
        """Greedy generation; returns new tokens per prompt and, per prompt, logits [steps, V] of each step."""
        outputs: list[list[int]] = [[] for _ in prompts]
        step_logits: list[list[Tensor]] = [[] for _ in prompts]
        for start in range(0, len(prompts), self.batch_size):
            wave = list(range(start, min(start + self.batch_size, len(prompts))))
            self._generate_wave(prompts, wave, max_new_tokens, outputs, step_logits)
        self.comm.finish()
        return outputs, [torch.stack(s) if s else torch.empty(0) for s in step_logits]

    def _generate_wave(self, prompts, wave, max_new_tokens, outputs, step_logits) -> None:
        if max_new_tokens <= 0:
            return
        self.cache = KVCache(self.num_layers)
        for i in wave:
            self.cache.add_sequence(i)
        lengths = {i: len(prompts[i]) for i in wave}
        ids = [t for i in wave for t in prompts[i]]
        positions = [p for i in wave for p in range(lengths[i])]
        active = list(wave)
        last = self._forward(ids, positions, StepLayout(active, [lengths[i] for i in active]))
        while True:
            nxt = last.argmax(dim=-1).tolist()
            still = []
            for i, tok, row in zip(active, nxt, last):
                outputs[i].append(tok)
                step_logits[i].append(row)
                lengths[i] += 1
                if tok not in self.eos and len(outputs[i]) < max_new_tokens:
                    still.append(i)
                else:
                    self.cache.drop_sequence(i)
            active = still
            if not active:
                return
            last = self._forward(
                [outputs[i][-1] for i in active], [lengths[i] - 1 for i in active], StepLayout(active, [1] * len(active))
            )


class ExpertRole:
    """Runs the expert program once per forward of the attention replicas, until all of them are done."""

    def __init__(self, program: fx.GraphModule, comm):
        self.program, self.comm = program, comm
        self.forwards = 0
        self.on_forward = None  # fault-injection hook for tests

    def expert_recv(self, layer, hidden_size, top_k, dtype):
        return self.comm.expert_recv(layer, hidden_size, top_k, dtype)

    def expert_send(self, hidden, layer):
        self.comm.expert_send(hidden, layer)

    def serve(self) -> int:
        while self.comm.begin_forward():
            with context.use(self), torch.no_grad():
                self.program()
            self.forwards += 1
            if self.on_forward is not None:
                self.on_forward(self.forwards)
        return self.forwards
