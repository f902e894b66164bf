"""Colocated execution on one GPU: attention, router and experts of a captured program in one process.

This is what a one-GPU user runs, and the baseline the planner compares disaggregated plans with. The
program is the captured graph (msc ops for attention, router and experts); this engine is its runtime
context: a paged KV cache (msc.runtime.paged_kv) with the Triton decode-attention kernel, the fused Triton
MoE kernel (msc::experts picks it on CUDA), and decode steps replayed from CUDA graphs, one per batch
bucket, so that a step is not bound by kernel launches.

Greedy generation keeps everything on the device between steps: the captured step itself computes the
slots and lengths from the positions, takes the argmax, feeds it back as the next input and advances the
positions, so the host only replays graphs and never waits for the GPU until the end.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import Tensor

from msc.errors import MscError
from msc.runtime import context
from msc.runtime.paged_kv import PagedKVCache, StepMeta, paged_attention

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def _logits(out) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class _DecodeGraph:
    """Static buffers of one batch bucket and the CUDA graph that reads and writes them."""

    batch: int
    input_ids: Tensor  # [1, Bb]
    positions: Tensor  # [Bb] int64, position of the token being fed
    valid: Tensor  # [Bb] bool, False for padding rows
    meta: StepMeta
    next_ids: Tensor  # [Bb] int64, the argmax of the step
    graph: torch.cuda.CUDAGraph | None = None


@dataclass
class GenerateResult:
    tokens: list[list[int]]  # new tokens per prompt
    prefill_s: float
    step_s: list[float] = field(default_factory=list)  # decode steps (CUDA-event times)

    @property
    def median_step_s(self) -> float:
        s = sorted(self.step_s)
        return s[len(s) // 2] if s else float("nan")


class ColocatedEngine:
    """Runs a colocated program (a GraphModule with weights on the GPU) as a greedy generator.

    gm(input_ids [1, T], position_ids [1, T]) -> logits [1, T, V], calling msc::attention on this engine.
    max_batch / max_seq_len size the KV cache (every sequence's blocks are reserved for its whole length
    when it starts). prefill_tokens: the most tokens one prefill forward packs (bounds the activations).
    """

    def __init__(self, gm: fx.GraphModule, num_layers: int, device: str | torch.device = "cuda", *, max_batch: int = 256,
                 max_seq_len: int = 2048,
                 page_size: int = 16, cuda_graphs: bool = True, buckets: tuple[int, ...] = DEFAULT_BUCKETS,
                 prefill_tokens: int = 16384):
        self.gm, self.num_layers = gm, num_layers
        self.device = torch.device(device)
        self.max_batch, self.max_seq_len, self.page_size = max_batch, max_seq_len, page_size
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.buckets = tuple(b for b in buckets if b < max_batch) + (max_batch,)
        self.prefill_tokens = prefill_tokens
        self.cache: PagedKVCache | None = None
        self.meta: StepMeta | None = None
        self._graphs: dict[int, _DecodeGraph] = {}
        self._pool = None

    # ------------------------------------------------------------------ RuntimeContext (msc::attention)
    def attention(self, q, k, v, layer, scaling, sliding_window, sinks=None):
        if sinks is not None:
            raise MscError("the GPU engine's paged attention has no attention sinks yet (GPT-OSS); run on the CPU runtime")
        if self.cache is None:
            raise MscError("ColocatedEngine: attention ran before the KV cache was made (call generate())")
        return paged_attention(self.cache, layer, q, k, v, self.meta, scaling, sliding_window)

    def dispatch(self, *a):
        raise MscError("a colocated program has no dispatch; this looks like an attention role's program")

    combine = expert_recv = expert_send = dispatch

    # ------------------------------------------------------------------ cache
    def _make_cache(self, nkv: int, d: int, dv: int, dtype: torch.dtype) -> None:
        blocks_per_seq = -(-self.max_seq_len // self.page_size)
        num_blocks = self.max_batch * blocks_per_seq + 1  # + the scratch block padding rows write to
        self.cache = PagedKVCache(self.num_layers, num_blocks, self.page_size, nkv, d, dv, dtype, self.device,
                                  self.max_seq_len)
        self.cache.k.zero_()
        self.cache.v.zero_()
        self._scratch_block = self.cache.scratch_slot // self.page_size

    def _reserve(self, lengths: list[int]) -> list[int]:
        """Sequences 0..B-1 with pages for their whole lengths (the cache made on first use); their ids."""
        if self.cache is None:
            self._make_cache(*self.kv_shape_from_probe())
        for i, n in enumerate(lengths):
            self.cache.drop_sequence(i)
            self.cache.add_sequence(i)
            self.cache.ensure(i, n)
        return list(range(len(lengths)))

    def kv_shape_from_probe(self) -> tuple[int, int, int, torch.dtype]:
        """nkv, d, dv and dtype of the cache, read off one tiny eager forward (no cache needed: T=1 prefill)."""
        shapes = {}

        class _Probe:
            def attention(_, q, k, v, layer, scaling, sliding_window, sinks=None):
                shapes.setdefault("kv", (k.shape[1], k.shape[3], v.shape[3], k.dtype))
                return q.new_zeros(1, q.shape[2], q.shape[1], v.shape[3])

        ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        with context.use(_Probe()), torch.no_grad():
            self.gm(ids, ids)
        return shapes["kv"]

    # ------------------------------------------------------------------ prefill
    def _prefill(self, prompts: list[list[int]], seq_ids: list[int]) -> Tensor:
        """Fresh sequences through the program in chunks of <= prefill_tokens; first new token of each [B]."""
        firsts = []
        i = 0
        while i < len(prompts):
            j, tokens = i, 0
            while j < len(prompts) and (j == i or tokens + len(prompts[j]) <= self.prefill_tokens):
                tokens += len(prompts[j])
                j += 1
            lengths = [len(p) for p in prompts[i:j]]
            self.meta = StepMeta.for_prefill(self.cache, seq_ids[i:j], lengths)
            ids = torch.tensor([[t for p in prompts[i:j] for t in p]], device=self.device)  # [1, T]
            pos = torch.tensor([[q for n in lengths for q in range(n)]], device=self.device)  # [1, T]
            with context.use(self), torch.no_grad():
                logits = _logits(self.gm(ids, pos))  # [1, T, V]
            ends = torch.tensor(lengths, device=self.device).cumsum(0) - 1  # [B_chunk]
            firsts.append(logits[0, ends].argmax(-1))  # [B_chunk]
            i = j
        return torch.cat(firsts)  # [B]

    # ------------------------------------------------------------------ decode
    def _bucket(self, batch: int) -> int:
        for b in self.buckets:
            if b >= batch:
                return b
        raise MscError(f"batch {batch} is larger than the engine's max_batch {self.max_batch}")

    def _static(self, bb: int) -> _DecodeGraph:
        dev = self.device
        meta = StepMeta(
            slots=torch.full((bb,), self.cache.scratch_slot, dtype=torch.long, device=dev),
            block_tables=torch.full((bb, self.cache.max_blocks_per_seq), self._scratch_block, dtype=torch.int32, device=dev),
            seq_lens=torch.zeros(bb, dtype=torch.int32, device=dev), decode=True)
        return _DecodeGraph(bb, torch.zeros(1, bb, dtype=torch.long, device=dev), torch.zeros(bb, dtype=torch.long, device=dev),
                            torch.zeros(bb, dtype=torch.bool, device=dev), meta, torch.zeros(bb, dtype=torch.long, device=dev))

    def _step_body(self, s: _DecodeGraph) -> None:
        """One decode step on static buffers (this is what the CUDA graph records)."""
        page = self.page_size
        rows = torch.arange(s.batch, device=self.device)  # [Bb]
        block = s.meta.block_tables[rows, s.positions // page].long()  # [Bb]
        slots = block * page + s.positions % page  # [Bb]
        s.meta.slots.copy_(torch.where(s.valid, slots, torch.full_like(slots, self.cache.scratch_slot)))
        s.meta.seq_lens.copy_(torch.where(s.valid, s.positions + 1, torch.zeros_like(s.positions)).to(torch.int32))
        self.meta = s.meta
        with context.use(self), torch.no_grad():
            logits = _logits(self.gm(s.input_ids, s.positions[None]))  # [1, Bb, V]
        nxt = logits[0].argmax(-1)  # [Bb]
        s.next_ids.copy_(nxt)
        s.input_ids[0].copy_(nxt)
        s.positions.add_(s.valid.long())

    def _graph_for(self, bb: int) -> _DecodeGraph:
        s = self._graphs.get(bb)
        if s is not None:
            return s
        s = self._static(bb)
        if self.cuda_graphs:
            # NOTE: warm up on a side stream first (Triton compiles, cuBLAS picks its kernels), as CUDA-graph
            # capture requires; padding rows only (valid all False) write to the scratch block.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._step_body(s)
            torch.cuda.current_stream().wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            s.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(s.graph, pool=self._pool):
                self._step_body(s)
        self._graphs[bb] = s
        return s

    def _load(self, s: _DecodeGraph, seq_ids: list[int], first: Tensor, positions: list[int]) -> None:
        b = len(seq_ids)
        s.valid.zero_()
        s.valid[:b] = True
        s.input_ids.zero_()
        s.input_ids[0, :b] = first
        s.positions.zero_()
        s.positions[:b] = torch.tensor(positions, device=self.device)
        s.meta.block_tables.fill_(self._scratch_block)
        s.meta.block_tables[:b] = self.cache.block_table(seq_ids)

    # ------------------------------------------------------------------ timing (msc profile)
    def time_decode(self, batch: int, context: int, steps: int = 20, warmup: int = 3) -> float:
        """Median seconds of one decode step of `batch` sequences at `context` tokens each (synthetic: the
        cache holds whatever is in it; the step does the work of a real one, from its CUDA graph)."""
        seq_ids = self._reserve([context + steps + warmup + 1] * batch)
        s = self._graph_for(self._bucket(batch))
        first = torch.randint(0, 16, (batch,), device=self.device)  # any model has 16 token ids
        self._load(s, seq_ids, first, [context] * batch)
        run = s.graph.replay if s.graph is not None else (lambda: self._step_body(s))
        for _ in range(warmup):
            run()
        times = []
        for _ in range(steps):
            if self.device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                run()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            else:
                t = time.perf_counter()
                run()
                times.append(time.perf_counter() - t)
        for i in seq_ids:
            self.cache.drop_sequence(i)
        return sorted(times)[len(times) // 2]

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> GenerateResult:
        """Greedy generation of exactly max_new_tokens per prompt (EOS is not checked during the loop)."""
        if not prompts or max_new_tokens <= 0:
            raise MscError("generate: give at least one prompt and max_new_tokens >= 1")
        if len(prompts) > self.max_batch:
            raise MscError(f"generate: {len(prompts)} prompts, but the engine holds at most max_batch={self.max_batch}")
        longest = max(len(p) for p in prompts) + max_new_tokens
        if longest > self.max_seq_len:
            raise MscError(f"generate: a sequence reaches {longest} tokens; the engine was made for max_seq_len={self.max_seq_len}")
        seq_ids = self._reserve([len(p) + max_new_tokens for p in prompts])
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        first = self._prefill(prompts, seq_ids)  # [B]
        sync()
        prefill_s = time.perf_counter() - t0
        out = torch.empty(max_new_tokens, len(prompts), dtype=torch.long, device=self.device)  # [steps, B]
        out[0] = first
        steps = max_new_tokens - 1
        step_s: list[float] = []
        if steps:
            s = self._graph_for(self._bucket(len(prompts)))
            self._load(s, seq_ids, first, [len(p) for p in prompts])
            events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)] if self.device.type == "cuda" else []
            if events:
                events[0].record()
            for i in range(steps):
                t = time.perf_counter()
                if s.graph is not None:
                    s.graph.replay()
                else:
                    self._step_body(s)
                out[i + 1] = s.next_ids[: len(prompts)]
                if events:
                    events[i + 1].record()
                else:
                    step_s.append(time.perf_counter() - t)
            sync()
            if events:
                step_s = [a.elapsed_time(b) / 1e3 for a, b in zip(events, events[1:])]
        for i in seq_ids:
            self.cache.drop_sequence(i)
        return GenerateResult(out.T.tolist(), prefill_s, step_s)
