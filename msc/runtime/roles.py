"""What each role process does with its program: the attention replica generates, an expert node serves.

Both run their program as stages (msc/runtime/staged.py), one micro-batch at a time: the attention
replica splits each step's sequences into up to m micro-batches and runs them ping-pong, so that one
micro-batch's attention runs while another's tokens are at the experts; an expert node runs the layer
of whichever micro-batch has arrived from every replica first.
"""
from __future__ import annotations

import os
import time

import torch
import torch.fx as fx
from torch import Tensor

from msc.runtime import context
from msc.errors import MscError
from msc.runtime.kv_cache import KVCache, StepLayout, cached_attention
from msc.runtime.paged_kv import PagedKVCache, StepMeta, paged_attention
from msc.runtime.staged import StagedProgram, ping_pong, split_microbatches
from msc.runtime.trace import Trace


PAGE_SIZE = 16  # tokens per KV page
# the most prompt tokens one prefill forward packs (a tuning knob; tests set it small)
PREFILL_TOKENS = int(os.environ.get("MSC_PREFILL_TOKENS", "16384"))


def _injected_delay(trace: Trace, seconds: float, layer, mb) -> None:
    """Stand-in compute for demos and tests of the pipeline (spec runtime.delay_ms); 0 does nothing."""
    if seconds > 0:
        with trace.span("compute", "injected delay", layer, mb, injected=True):
            time.sleep(seconds)


class AttentionRole:
    """Runs the attention program: prefill + greedy decode with a KV cache, experts reached via `comm`."""

    def __init__(self, program: fx.GraphModule, comm, num_layers: int, eos_token_id, batch_size: int, device="cpu", *,
                 microbatches: int = 1, delay_s: float = 0.0, trace: Trace | None = None, kv_cache: str = "auto"):
        self.program, self.comm, self.num_layers = StagedProgram(program), comm, num_layers
        eos = eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
        self.eos = {e for e in eos if e is not None}
        self.batch_size, self.device = batch_size, torch.device(device)
        self.microbatches, self.delay_s = microbatches, delay_s
        self.trace = trace or Trace("attention", 0, enabled=False)
        comm.trace = self.trace
        self.cache: KVCache | PagedKVCache | None = None
        # NOTE: the paged cache is the GPU layout (Triton decode attention over pages); a role on the CPU
        # keeps the contiguous per-sequence cache unless the spec asks for pages.
        self.paged = kv_cache == "paged" or (kv_cache == "auto" and self.device.type == "cuda")
        self._wave: tuple[list[int], int] | None = None  # sequences and longest length of the wave (paged)
        self._ctx_len: dict[int, int] = {}  # tokens each sequence has in the cache (paged)
        self._meta_key, self._meta = None, None
        self.layout: StepLayout | None = None
        self.mb, self.step_microbatches = 0, 1
        self.forwards = 0
        self.step_times: list[float] = []  # seconds per forward (prefill first)
        self.decode_times: list[float] = []  # seconds per decode forward (prefill forwards left out)
        self._prefilling = False
        self.on_forward = None  # fault-injection hook for tests

    # ------------------------------------------------------------------ RuntimeContext
    def attention(self, q, k, v, layer, scaling, sliding_window, sinks=None):
        _injected_delay(self.trace, self.delay_s / self.step_microbatches, layer, self.mb)
        if self.paged:
            if sinks is not None:
                raise MscError("the paged KV cache has no attention sinks (GPT-OSS); set runtime.kv_cache: contiguous")
            return paged_attention(self._paged_cache(k, v), layer, q, k, v, self._step_meta(), scaling, sliding_window)
        return cached_attention(self.cache, self.layout, q, k, v, layer, scaling, sliding_window, sinks)

    def _paged_cache(self, k: Tensor, v: Tensor) -> PagedKVCache:
        """The wave's paged cache, made at its first attention call (when the K/V head shapes are known),
        with every sequence's pages reserved for its whole length."""
        if self.cache is None:
            seqs, longest = self._wave
            page = PAGE_SIZE
            blocks = len(seqs) * -(-longest // page) + 1  # + the scratch page
            self.cache = PagedKVCache(self.num_layers, blocks, page, k.shape[1], k.shape[3], v.shape[3], k.dtype,
                                      self.device, longest)
            for s in seqs:
                self.cache.add_sequence(s)
                self.cache.ensure(s, longest)
        return self.cache

    def _step_meta(self) -> StepMeta:
        """Slots, block tables and lengths of the current micro-batch (built once per forward and micro-batch)."""
        key = (self.forwards, self.mb)
        if self._meta_key != key:
            lay = self.layout
            if all(self._ctx_len[s] == 0 for s in lay.seq_ids):
                meta = StepMeta.for_prefill(self.cache, lay.seq_ids, lay.lengths)
            elif all(n == 1 for n in lay.lengths):
                meta = StepMeta.for_decode(self.cache, lay.seq_ids, [self._ctx_len[s] for s in lay.seq_ids])
            else:
                raise MscError("paged KV cache: a step that mixes prompts and decode tokens is not supported")
            self._meta_key, self._meta = key, meta
        return self._meta

    def dispatch(self, hidden, idx, weights, layer, bounds):
        return self.comm.dispatch(hidden, idx, weights, layer, bounds)

    def combine(self, ticket, hidden, layer):
        return self.comm.combine(ticket, hidden, layer)

    # ------------------------------------------------------------------ generation
    def _forward(self, ids: list[int], positions: list[int], layout: StepLayout) -> Tensor:
        """One step of every active sequence, as up to m micro-batches run ping-pong; logits [B, V]."""
        t0 = time.time_ns()
        groups = split_microbatches(layout.lengths, self.microbatches)
        self.step_microbatches = len(groups)
        self.comm.begin_forward(len(groups))
        starts = layout.starts
        layouts, envs = [], []
        for g in groups:
            lo, hi = starts[g.start], starts[g.stop - 1] + layout.lengths[g.stop - 1]  # this group's tokens
            layouts.append(StepLayout([layout.seq_ids[i] for i in g], [layout.lengths[i] for i in g]))
            input_ids = torch.tensor([ids[lo:hi]], dtype=torch.long, device=self.device)  # [1, T_mb]
            position_ids = torch.tensor([positions[lo:hi]], dtype=torch.long, device=self.device)  # [1, T_mb]
            envs.append(self.program.start(input_ids, position_ids))
        stage_layers = self.program.stage_layers
        with context.use(self), torch.no_grad():
            for stage, mb in ping_pong(self.program.num_stages, len(groups)):
                self.mb = self.comm.mb = mb
                self.layout = layouts[mb]
                layer = stage_layers[stage][-1] if stage_layers[stage] else None
                with self.trace.span("compute", f"attention stage {stage}", layer, mb):
                    self.program.run_stage(stage, envs[mb])
        rows = []
        for env, lay in zip(envs, layouts):
            out = self.program.output(env)
            logits = out[0] if isinstance(out, (tuple, list)) else out  # [1, T_mb, V]
            ends = torch.tensor(lay.starts) + torch.tensor(lay.lengths) - 1
            rows.append(logits[0, ends].float())  # [B_mb, V] logits of each sequence's last token
        if self.paged:
            for s, n in zip(layout.seq_ids, layout.lengths):
                self._ctx_len[s] += n
        t1 = time.time_ns()
        self.step_times.append((t1 - t0) / 1e9)
        if not self._prefilling:
            self.decode_times.append((t1 - t0) / 1e9)
        self.trace.mark_step(t0, t1, len(ids), len(groups))
        self.trace.step += 1
        self.forwards += 1
        if self.on_forward is not None:
            self.on_forward(self.forwards)
        return torch.cat(rows)  # [B, V]

    def generate(self, prompts: list[list[int]], max_new_tokens: int | list[int], *,
                 finish: bool = True) -> tuple[list[list[int]], list[Tensor]]:
        """Greedy generation; returns new tokens per prompt and, per prompt, logits [steps, V] of each step.
        max_new_tokens: one limit for all prompts or one per prompt. finish: tell the expert nodes that this
        replica is done afterwards (a serving replica generates again later and does not)."""
        limits = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * len(prompts)
        if len(limits) != len(prompts):
            raise MscError(f"{len(limits)} max_new_tokens for {len(prompts)} prompts")
        outputs: list[list[int]] = [[] for _ in prompts]
        step_logits: list[list[Tensor]] = [[] for _ in prompts]
        todo = [i for i in range(len(prompts)) if limits[i] > 0]
        for start in range(0, len(todo), self.batch_size):
            self._generate_wave(prompts, todo[start:start + self.batch_size], limits, outputs, step_logits)
        if finish:
            self.comm.finish()
        return outputs, [torch.stack(s) if s else torch.empty(0) for s in step_logits]

    def _generate_wave(self, prompts, wave, limits, outputs, step_logits) -> None:
        if self.paged:  # made at the first attention call, once the K/V shapes are known
            self.cache, self._meta_key = None, None
            self._wave = (list(wave), max(len(prompts[i]) + limits[i] for i in wave))
            self._ctx_len = {i: 0 for i in wave}
        else:
            self.cache = KVCache(self.num_layers)
            for i in wave:
                self.cache.add_sequence(i)
        lengths = {i: len(prompts[i]) for i in wave}
        active = list(wave)
        # NOTE: prefill goes in forwards of at most PREFILL_TOKENS tokens (whole prompts each), so a large
        # batch of long prompts does not materialise activations and logits for every token at once.
        chunks, chunk, tokens = [], [], 0
        for i in wave:
            if chunk and tokens + lengths[i] > PREFILL_TOKENS:
                chunks.append(chunk)
                chunk, tokens = [], 0
            chunk.append(i)
            tokens += lengths[i]
        chunks.append(chunk)
        self._prefilling = True
        last = torch.cat([
            self._forward([t for i in c for t in prompts[i]], [p for i in c for p in range(lengths[i])],
                          StepLayout(c, [lengths[i] for i in c]))
            for c in chunks
        ])  # [B, V]
        self._prefilling = False
        while True:
            nxt = last.argmax(dim=-1).tolist()
            still = []
            for i, tok, row in zip(active, nxt, last):
                outputs[i].append(tok)
                step_logits[i].append(row)
                lengths[i] += 1
                if tok not in self.eos and len(outputs[i]) < limits[i]:
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

    def __init__(self, program: fx.GraphModule, comm, *, delay_s: float = 0.0, trace: Trace | None = None):
        self.program, self.comm = StagedProgram(program), comm
        self.delay_s = delay_s
        self.trace = trace or Trace("expert", 0, enabled=False)
        comm.trace = self.trace
        self.forwards = 0
        self.on_forward = None  # fault-injection hook for tests

    def expert_recv(self, layer, hidden_size, top_k, dtype):
        batch = self.comm.expert_recv(layer, hidden_size, top_k, dtype)
        _injected_delay(self.trace, self.delay_s / self.comm.microbatches, layer, self.comm.mb)  # the experts' stand-in compute
        return batch

    def expert_send(self, hidden, layer):
        self.comm.expert_send(hidden, layer)

    def serve(self) -> int:
        """Serve forwards until every attention replica is done; returns how many."""
        prog, layers = self.program, self.program.stage_layers
        while True:
            with self.trace.span("wait", "wait for a forward"):
                if not self.comm.begin_forward():
                    break
            m = self.comm.microbatches
            envs = [prog.start() for _ in range(m)]
            next_stage = {mb: 0 for mb in range(m)}  # per micro-batch: its next layer's stage
            with context.use(self), torch.no_grad():
                while next_stage:
                    # NOTE: data-driven order: run whichever micro-batch's next layer has arrived from every
                    # replica (lowest micro-batch first among those that have), not a fixed ping-pong list.
                    items = [(layers[s][0], mb) for mb, s in next_stage.items()]
                    with self.trace.span("wait", "wait for tokens"):
                        layer, mb = items[self.comm.wait_ready(items)]
                    stage = next_stage[mb]
                    self.comm.mb = mb
                    with self.trace.span("compute", f"experts L{layer}", layer, mb):
                        prog.run_stage(stage, envs[mb])
                    next_stage[mb] += 1
                    if next_stage[mb] == prog.num_stages:
                        del next_stage[mb]
            self.trace.step += 1
            self.forwards += 1
            if self.on_forward is not None:
                self.on_forward(self.forwards)
        return self.forwards
