"""The model runner: executes one scheduled step of a program and returns the logits to sample from.

One runner serves both kinds of program:
- a **colocated** program (attention, router and experts in this process) runs whole, once per step; on a
  GPU, decode-only steps replay a CUDA graph captured per batch bucket (static inputs, step metadata and
  logits), so a step is not bound by kernel launches;
- an **attention role** program (the experts behind `msc::dispatch` / `msc::combine`, on expert nodes)
  runs as stages, the step's sequences cut into up to m micro-batches that go ping-pong: while one
  micro-batch's tokens are at the expert nodes, the next one's attention runs.

The runner is the runtime context the program's msc ops call: `attention` reads and writes the paged KV
cache with the metadata of the micro-batch being run; `dispatch` / `combine` go to the exchange.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.fx as fx
from torch import Tensor

from msc import env as msc_env
from msc.errors import MscError
from msc.runtime import context, sequence_state
from msc.runtime.sequence_state import SequenceStates, state_key
from msc.runtime.paged_kv import PagedKVCache, StepMeta, paged_attention, paged_mla_attention
from msc.runtime.staged import StagedProgram, ping_pong, split_microbatches
from msc.runtime.transfer import tensor_to_device
from msc.runtime.trace import Trace

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def _logits(out) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _select_rows(x: Tensor, rows: list[int]) -> Tensor:
    """x[rows] with the index copied over without a host sync (a list index would wait for the device)."""
    return x.index_select(0, tensor_to_device(rows, torch.long, x.device))


@dataclass
class StepInput:
    """The tokens of one step, packed along T: sequence i (cache id seq_ids[i]) feeds counts[i] tokens from
    position contexts[i] on; `sample_rows` are the indices i whose last token's logits are wanted."""

    seq_ids: list[int]
    contexts: list[int]
    counts: list[int]
    token_ids: list[int]
    sample_rows: list[int]
    # tokens still on the device (sampled by the step before, not yet read back: msc.engine.engine's overlap):
    # token_ids[device_dst[j]] is device_src[device_rows[j]] (token_ids holds a placeholder there)
    device_dst: list[int] = field(default_factory=list)
    device_rows: list[int] = field(default_factory=list)
    device_src: Tensor | None = None

    @property
    def decode_only(self) -> bool:
        return all(n == 1 for n in self.counts)


def decode_token_ids(batch: int, vocab_size: int, seed: int = 0) -> list[int]:
    """Token ids for a synthetic decode step: different tokens route to different experts, as a real batch's do.

    NOTE: one id for every sequence would send the whole batch to the same top-k experts, and a step would
    read a fraction of the expert weights a real step reads."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch,), generator=g).tolist()


@dataclass
class _Graph:
    """Static buffers of one decode batch bucket and the CUDA graph that reads and writes them."""

    batch: int
    input_ids: Tensor  # [1, Bb]
    positions: Tensor  # [1, Bb]
    meta: StepMeta
    logits: Tensor | None = None  # [Bb, V] written by the graph
    graph: torch.cuda.CUDAGraph | None = None


@dataclass
class _DeviceStep:
    """Static inputs, per-micro-batch metadata and logits of one (micro-batches, bucket) device step, its graph."""

    input_ids: list[Tensor]  # m x [1, Bb]
    positions: list[Tensor]  # m x [1, Bb]
    metas: list[StepMeta]
    logits: list[Tensor] | None = None  # m x [Bb, V]
    graph: torch.cuda.CUDAGraph | None = None
    runs: int = 0


class ModelRunner:
    """Runs steps of `program` (colocated, or an attention role's with `exchange`); see the module docstring."""

    def __init__(self, program: fx.GraphModule, num_layers: int, device, *, exchange=None, microbatches: int = 1,
                 cuda_graphs: bool = True, max_batch: int = 256, trace: Trace | None = None, delay_s: float = 0.0):
        self.device = torch.device(device)
        self.num_layers = num_layers
        self.exchange = exchange
        self.remote = exchange is not None
        self.program = program
        self.staged = StagedProgram(program) if self.remote else None
        self.microbatches = microbatches
        self.trace = trace or Trace("attention", 0, enabled=False)
        if exchange is not None:
            exchange.trace = self.trace
        self.delay_s = delay_s
        # NOTE: a colocated program's decode steps replay one CUDA graph per batch bucket. An attention role's
        # stages hold host-side communication (dispatch picks each node's tokens on the host), so only the
        # compute between its communication ops can be captured (msc.engine.stage_graphs): MSC_STAGE_GRAPHS=on.
        # Off by default: on a GPU (session 12) the host round trips dominate either way, and the device
        # exchange makes the whole step one graph instead (=emulate runs the same bookkeeping without CUDA, as
        # the CPU tests do)
        # NOTE: DeepSeek's sparse attention (msc::dsa_index) reads each step's lengths on the host
        # (msc.runtime.sparse_index): such a program's steps are never captured in CUDA graphs
        self.graph_safe = not any(n.op == "call_function" and n.target is torch.ops.msc.dsa_index.default
                                  for n in program.graph.nodes)
        cuda_graphs = cuda_graphs and self.graph_safe
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda" and not self.remote
        mode = msc_env.choice("MSC_STAGE_GRAPHS")
        self.stage_graphs = None
        if self.remote and cuda_graphs and (mode == "emulate" or (mode == "on" and self.device.type == "cuda")):
            from msc.engine.stage_graphs import StageGraphs

            self.stage_graphs = StageGraphs(self.staged.root, self.staged.num_stages, self.staged.weight_args, self,
                                            emulate=self.device.type != "cuda")
        self._static_metas: dict[int, StepMeta] = {}
        self.max_batch = max_batch
        self.buckets = tuple(b for b in DEFAULT_BUCKETS if b < max_batch) + (max_batch,)
        self.cache: PagedKVCache | None = None
        self.meta: StepMeta | None = None
        self._graphs: dict[int, _Graph] = {}
        self._pool = None
        self.mb, self.step_microbatches = 0, 1
        self.step_no = 0
        # msc.runtime.device_exchange.AttentionDeviceExchange, set by the role when the run uses it: decode-only
        # steps then run as one graph per (micro-batches, bucket) with the hand-offs on the device
        self.device_exchange = None
        self._step_exchange = None  # the exchange the msc ops talk to while a step runs (set per step)
        self._device_steps: dict[tuple[int, int], _DeviceStep] = {}
        self._device_eager_runs = 0

    # ------------------------------------------------------------------ RuntimeContext
    def attention(self, q, k, v, layer, scaling, sliding_window, sinks=None):
        if self.delay_s > 0:
            with self.trace.span("compute", "injected delay", layer, self.mb, injected=True):
                time.sleep(self.delay_s / self.step_microbatches)
        return paged_attention(self.cache, layer, q, k, v, self.meta, scaling, sliding_window, sinks)

    def mla_attention(self, q, latent, k_rot, kv_b, layer, scaling, sliding_window, nope_dim, v_head_dim, indices=None):
        if self.delay_s > 0:
            with self.trace.span("compute", "injected delay", layer, self.mb, injected=True):
                time.sleep(self.delay_s / self.step_microbatches)
        return paged_mla_attention(self.cache, layer, q, latent, k_rot, kv_b, self.meta, scaling, sliding_window,
                                   nope_dim, v_head_dim, indices)

    def dsa_index(self, q, k, weights, layer, topk, scale):
        from msc.runtime.sparse_index import dsa_index

        return dsa_index(self.cache, self.meta, layer, q, k, weights, topk, scale)

    def causal_conv1d(self, x, weight, bias, layer, index, activation):
        return sequence_state.causal_conv1d(self.cache.states, self.meta, state_key(layer, "conv", index), x, weight,
                                            bias, activation)

    def gated_delta_rule(self, q, k, v, g, beta, layer, qk_l2norm):
        return sequence_state.gated_delta_rule(self.cache.states, self.meta, state_key(layer, "delta"), q, k, v, g, beta,
                                               qk_l2norm)

    def mamba2_scan(self, x, b, c, dt, a_log, d, dt_bias, layer, heads, groups, dt_min, dt_max):
        return sequence_state.mamba2_scan(self.cache.states, self.meta, state_key(layer, "ssm"), x, b, c, dt, a_log, d,
                                          dt_bias, heads, groups, dt_min, dt_max)

    def mamba_scan(self, x, dt, b, c, gate, a_log, d, dt_bias, layer):
        return sequence_state.mamba_scan(self.cache.states, self.meta, state_key(layer, "ssm"), x, dt, b, c, gate,
                                         a_log, d, dt_bias)

    def linear_attention(self, q, k, v, log_decay, layer):
        return sequence_state.linear_attention(self.cache.states, self.meta, state_key(layer, "kv"), q, k, v, log_decay)

    def dispatch(self, hidden, idx, weights, layer, bounds):
        if not self.remote:
            raise MscError("a colocated program has no dispatch; this looks like an attention role's program")
        return (self._step_exchange or self.exchange).dispatch(hidden, idx, weights, layer, bounds)

    def combine(self, ticket, hidden, layer):
        return (self._step_exchange or self.exchange).combine(ticket, hidden, layer)

    def expert_recv(self, *a):
        raise MscError("an expert node's program cannot run in the engine; give it the attention or colocated program")

    expert_send = expert_recv

    # ------------------------------------------------------------------ the cache
    def kv_shape(self) -> tuple[int, int, int, torch.dtype, bool]:
        """nkv, d, dv, dtype and v_in_k of the KV cache, read off one token through the program (experts
        answered with zeros: the probe needs the attention shapes only). MLA (msc::mla_attention) caches one
        shared head of width r + dr whose first r entries are the values (the latent): (1, r + dr, r, dtype, True)."""
        shapes = self._probe()
        if "kv" not in shapes:
            raise MscError("the program has no msc::attention: there is no KV cache to make")
        return shapes["kv"]

    def state_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Each state layer's per-sequence state {key: (shape, dtype)} (msc.runtime.sequence_state); {} for a model
        without state layers."""
        return self._probe()["states"]

    def _probe(self) -> dict:
        """The cache shapes of the program, read off one token run with every stateful op answered by a probe."""
        if getattr(self, "_probed", None) is not None:
            return self._probed
        shapes: dict = {"states": {}}

        class _Probe:
            def attention(_, q, k, v, layer, scaling, sliding_window, sinks=None):
                shapes.setdefault("kv", (k.shape[1], k.shape[3], v.shape[3], k.dtype, False))
                return q.new_zeros(1, q.shape[2], q.shape[1], v.shape[3])

            def dsa_index(_, q, k, weights, layer, topk, scale):
                shapes["index"] = (k.shape[-1], k.dtype)
                return torch.full((1, q.shape[1], topk), -1, dtype=torch.int64, device=q.device)

            def mla_attention(_, q, latent, k_rot, kv_b, layer, scaling, sliding_window, nope_dim, v_head_dim,
                              indices=None):
                r = latent.shape[-1]
                shapes.setdefault("kv", (1, r + k_rot.shape[-1], r, latent.dtype, True))
                return q.new_zeros(1, q.shape[2], q.shape[1], v_head_dim)

            def causal_conv1d(_, x, weight, bias, layer, index, activation):
                shapes["states"][state_key(layer, "conv", index)] = ((x.shape[1], weight.shape[-1] - 1), x.dtype)
                return torch.zeros_like(x)

            def gated_delta_rule(_, q, k, v, g, beta, layer, qk_l2norm):
                shapes["states"][state_key(layer, "delta")] = ((v.shape[2], k.shape[3], v.shape[3]), torch.float32)
                return v.new_zeros(v.shape, dtype=q.dtype)

            def mamba2_scan(_, x, b, c, dt, a_log, d, dt_bias, layer, heads, groups, dt_min, dt_max):
                shapes["states"][state_key(layer, "ssm")] = ((heads, x.shape[-1] // heads, b.shape[-1] // groups),
                                                             torch.float32)
                return torch.zeros_like(x)

            def mamba_scan(_, x, dt, b, c, gate, a_log, d, dt_bias, layer):
                shapes["states"][state_key(layer, "ssm")] = (tuple(a_log.shape), torch.float32)
                return torch.zeros_like(x)

            def linear_attention(_, q, k, v, log_decay, layer):
                shapes["states"][state_key(layer, "kv")] = ((v.shape[2], k.shape[3], v.shape[3]), torch.float32)
                return v.new_zeros(v.shape, dtype=q.dtype)

            def dispatch(_, hidden, idx, weights, layer, bounds):
                return torch.tensor([layer])

            def combine(_, ticket, hidden, layer):
                return torch.zeros_like(hidden)

        ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        with context.use(_Probe()), torch.no_grad():
            shapes["vocab"] = _logits(self.program(ids, ids)).shape[-1]
        self._probed = shapes
        return shapes

    def state_bytes_per_sequence(self) -> int:
        return sum(torch.Size(shape).numel() * torch.tensor([], dtype=dtype).element_size()
                   for shape, dtype in self.state_shapes().values())

    def kv_bytes_per_token(self) -> int:
        nkv, d, dv, dtype, v_in_k = self.kv_shape()
        per_layer = nkv * (d + (0 if v_in_k else dv)) * torch.tensor([], dtype=dtype).element_size()
        index = self._probe().get("index")  # DeepSeek sparse attention's indexer key
        if index is not None:
            per_layer += index[0] * torch.tensor([], dtype=index[1]).element_size()
        return self.num_layers * per_layer

    def make_cache(self, num_blocks: int, page_size: int, max_seq_len: int) -> PagedKVCache:
        nkv, d, dv, dtype, v_in_k = self.kv_shape()
        self.cache = PagedKVCache(self.num_layers, num_blocks, page_size, nkv, d, dv, dtype, self.device, max_seq_len,
                                  v_in_k=v_in_k)
        self.cache.k.zero_()
        if not v_in_k:
            self.cache.v.zero_()
        index = self._probe().get("index")
        if index is not None:
            self.cache.index_k = torch.zeros(self.num_layers, num_blocks, page_size, index[0], dtype=index[1],
                                             device=self.device)
        states = self.state_shapes()
        if states:  # one slot per sequence that can run at once, and the scratch slot of padding rows
            self.cache.states = SequenceStates(states, self.max_batch + 1, self.device)
        _ = self.cache.scratch_slot  # taken now, so the scheduler's page count never includes it
        return self.cache

    # ------------------------------------------------------------------ a step
    def execute(self, step: StepInput) -> Tensor:
        """Logits [len(step.sample_rows), V] of the last token of each sampled row."""
        t0 = time.time_ns()
        if self.remote:
            out = self._execute_staged(step)
        elif step.decode_only and self.cuda_graphs:
            out = self._execute_graph(step)
        else:
            out = self._execute_whole(step)
        self.trace.mark_step(t0, time.time_ns(), len(step.token_ids), self.step_microbatches)
        self.trace.step += 1
        return out

    def _inputs(self, step: StepInput, rows) -> tuple[Tensor, Tensor, StepMeta, list[int]]:
        """input_ids, position_ids [1, T], the meta of `rows` (indices into step) and each row's last token index."""
        starts, acc = [], 0
        for n in step.counts:
            starts.append(acc)
            acc += n
        ids, pos, ends, t = [], [], [], 0
        for i in rows:
            n, c = step.counts[i], step.contexts[i]
            ids += step.token_ids[starts[i]:starts[i] + n]
            pos += range(c, c + n)
            t += n
            ends.append(t - 1)
        meta = StepMeta.for_step(self.cache, [step.seq_ids[i] for i in rows], [step.contexts[i] for i in rows],
                                 [step.counts[i] for i in rows])
        input_ids = tensor_to_device([ids], torch.long, self.device)  # [1, T]
        position_ids = tensor_to_device([pos], torch.long, self.device)  # [1, T]
        return input_ids, position_ids, meta, ends

    def _device_tokens(self, step: StepInput, input_ids: Tensor) -> None:
        """Write the step's tokens that are still on the device into input_ids [1, T] (in place, queued)."""
        if not step.device_dst:
            return
        dst = tensor_to_device(step.device_dst, torch.long, self.device)  # [P]
        rows = tensor_to_device(step.device_rows, torch.long, self.device)  # [P]
        input_ids[0].index_copy_(0, dst, step.device_src.index_select(0, rows))

    def _execute_whole(self, step: StepInput) -> Tensor:
        rows = list(range(len(step.seq_ids)))
        input_ids, position_ids, self.meta, ends = self._inputs(step, rows)
        self._device_tokens(step, input_ids)
        self.step_microbatches = 1
        with context.use(self), torch.no_grad():
            logits = _logits(self.program(input_ids, position_ids))[0]  # [T, V]
        return _select_rows(logits, [ends[i] for i in step.sample_rows])  # [S, V]

    def _execute_staged(self, step: StepInput) -> Tensor:
        groups = split_microbatches(step.counts, self.microbatches)
        self.step_microbatches = len(groups)
        if self.device_exchange is not None and self.delay_s == 0:
            if step.decode_only and self.graph_safe:
                return self._execute_device(step, groups)
            return self._execute_device_eager(step, groups)
        graphs = self.stage_graphs if step.decode_only and self.stage_graphs is not None else None
        envs, metas, ends, buckets = [], [], [], []
        for g in groups:
            if graphs is None:
                input_ids, position_ids, meta, e = self._inputs(step, list(g))
                buckets.append(None)
            else:  # padded to its bucket: the rows past the batch write to the scratch slot and are dropped
                bb = self._bucket(len(g))
                input_ids, position_ids, meta, e = self._padded_decode(step, list(g), bb)
                input_ids, position_ids = input_ids.to(self.device), position_ids.to(self.device)
                buckets.append(bb)
            envs.append(self.staged.start(input_ids, position_ids))
            metas.append(meta)
            ends.append(e)
        self.exchange.begin_step(self.step_no, len(groups))
        stage_layers = self.staged.stage_layers
        with context.use(self), torch.no_grad():
            for stage, mb in ping_pong(self.staged.num_stages, len(groups)):
                self.mb = self.exchange.mb = mb
                layer = stage_layers[stage][-1] if stage_layers[stage] else None
                with self.trace.span("compute", f"attention stage {stage}", layer, mb):
                    if graphs is None:
                        self.meta = metas[mb]
                        self.staged.run_stage(stage, envs[mb])
                    else:
                        bb = buckets[mb]
                        self.meta = self._static_meta(bb).update_(metas[mb])
                        self.staged.run_stage(stage, envs[mb], call=lambda s, args: graphs.call(s, args, bb))
        self.step_no += 1
        return self._sampled(step, groups, ends, [lambda env=env: _logits(self.staged.output(env))[0] for env in envs])

    def _sampled(self, step: StepInput, groups: list[range], ends: list[list[int]], logits_of: list) -> Tensor:
        """The logits of the step's sampled rows [S, V] in row order; logits_of[mb]() gives micro-batch mb's
        [T_mb, V] (called only for micro-batches that hold a sampled row)."""
        wanted = set(step.sample_rows)
        rows = []
        for g, logits, e in zip(groups, logits_of, ends):
            pick = [k for k, i in enumerate(g) if i in wanted]
            if pick:
                rows.append(logits()[[e[k] for k in pick]])
        return torch.cat(rows) if rows else torch.empty(0, device=self.device)

    @property
    def captured_segments(self) -> int:
        """How many graphs the attention role captured: (stage, segment, bucket) stage graphs, or whole device
        steps (0 with neither)."""
        stage = len(self.stage_graphs._captured) if self.stage_graphs is not None else 0
        return stage + sum(d.graph is not None for d in self._device_steps.values())

    @property
    def device_steps_run(self) -> int:
        """How many steps (decode, prompt or mixed) went through the device exchange."""
        return sum(d.runs for d in self._device_steps.values()) + self._device_eager_runs

    # ------------------------------------------------------------------ device-exchange steps (attention role)
    def _execute_device_eager(self, step: StepInput, groups: list[range]) -> Tensor:
        """A prompt or mixed step through the device exchange, without graphs (its token counts vary)."""
        envs, metas, ends = [], [], []
        for g in groups:
            input_ids, position_ids, meta, e = self._inputs(step, list(g))
            envs.append(self.staged.start(input_ids, position_ids))
            metas.append(meta)
            ends.append(e)
        self.device_exchange.begin(max(sum(step.counts[i] for i in g) for g in groups), len(groups), eager=True)
        with self.trace.span("compute", f"device step m={len(groups)} (prompt tokens)"):
            self._run_device_stages(envs, metas)
        out = self._sampled(step, groups, ends, [lambda env=env: _logits(self.staged.output(env))[0] for env in envs])
        self.device_exchange.check()
        self._device_eager_runs += 1
        self.step_no += 1
        return out

    def _run_device_stages(self, envs: list, metas: list[StepMeta]) -> None:
        """Every stage of every micro-batch in ping-pong order, dispatch / combine through the device exchange."""
        devx = self.device_exchange
        self._step_exchange = devx
        try:
            with context.use(self), torch.no_grad():
                for stage, mb in ping_pong(self.staged.num_stages, len(envs)):
                    self.mb = devx.mb = mb
                    self.meta = metas[mb]
                    self.staged.run_stage(stage, envs[mb])
        finally:
            self._step_exchange = None

    def _execute_device(self, step: StepInput, groups: list[range]) -> Tensor:
        """A decode step whose hand-offs are device flags (msc.runtime.device_exchange): every micro-batch padded
        to one bucket, the whole step (all stages, all micro-batches in ping-pong order) one execution: eager the
        first time its (m, bucket) is seen, captured the second, replayed after."""
        m, bb = len(groups), self._bucket(max(len(g) for g in groups))
        d = self._device_steps.get((m, bb))
        if d is None:
            dev = self.device
            d = self._device_steps[(m, bb)] = _DeviceStep(
                [torch.zeros(1, bb, dtype=torch.long, device=dev) for _ in range(m)],
                [torch.zeros(1, bb, dtype=torch.long, device=dev) for _ in range(m)],
                [StepMeta.static(self.cache, bb) for _ in range(m)])
        ends = []
        for mb, g in enumerate(groups):
            ids, pos, meta, e = self._padded_decode(step, list(g), bb)
            d.input_ids[mb].copy_(ids, non_blocking=True)
            d.positions[mb].copy_(pos, non_blocking=True)
            d.metas[mb].update_(meta)
            ends.append(e)
        self.device_exchange.begin(bb, m)

        def body() -> None:
            envs = [self.staged.start(d.input_ids[mb], d.positions[mb]) for mb in range(m)]
            self._run_device_stages(envs, d.metas)
            d.logits = [_logits(self.staged.output(env))[0] for env in envs]  # m x [bb, V]

        with self.trace.span("compute", f"device step m={m} bucket={bb}"):
            if d.graph is not None:
                d.graph.replay()
            elif d.runs == 0 or self.device.type != "cuda":
                body()  # the warm-up (or the CPU's every step)
            else:
                d.graph = self.capture(body, warmups=0)
                d.graph.replay()
        d.runs += 1
        out = self._sampled(step, groups, ends, [lambda lg=lg: lg for lg in d.logits])
        self.device_exchange.check()  # reads the error word: waits for the step, as sampling would
        self.step_no += 1
        return out

    def _padded_decode(self, step: StepInput, rows: list[int], bb: int, meta_on_host: bool = False):
        """A decode micro-batch padded to bb rows: input_ids, position_ids [1, bb] (on the host), its meta
        (on the device; meta_on_host: pinned on the host) and its last-token rows."""
        b = len(rows)
        ids = torch.zeros(1, bb, dtype=torch.long)  # [1, bb]
        ids[0, :b] = torch.tensor([step.token_ids[i] for i in rows])
        pos = torch.zeros(1, bb, dtype=torch.long)  # [1, bb]
        pos[0, :b] = torch.tensor([step.contexts[i] for i in rows])
        meta = StepMeta.for_decode(self.cache, [step.seq_ids[i] for i in rows], [step.contexts[i] for i in rows], pad_to=bb,
                                   on_host=meta_on_host)
        return ids, pos, meta, list(range(b))

    def _static_meta(self, bb: int) -> StepMeta:
        """The step metadata a bucket's captured segments read (refreshed in place before each replay)."""
        if bb not in self._static_metas:
            self._static_metas[bb] = StepMeta.static(self.cache, bb)
        return self._static_metas[bb]

    # ------------------------------------------------------------------ CUDA graphs (colocated decode)
    def _bucket(self, batch: int) -> int:
        for b in self.buckets:
            if b >= batch:
                return b
        raise MscError(f"a step of {batch} sequences is larger than the largest batch bucket {self.buckets[-1]}")

    def _graph_for(self, bb: int) -> _Graph:
        g = self._graphs.get(bb)
        if g is not None:
            return g
        dev = self.device
        g = _Graph(bb, torch.zeros(1, bb, dtype=torch.long, device=dev), torch.zeros(1, bb, dtype=torch.long, device=dev),
                   StepMeta.static(self.cache, bb))

        def body():
            self.meta = g.meta
            with context.use(self), torch.no_grad():
                g.logits = _logits(self.program(g.input_ids, g.positions))[0]  # [Bb, V]

        g.graph = self.capture(body, warmups=2)  # padding rows (seq_len 0) write to the scratch slot only
        self._graphs[bb] = g
        return g

    def capture(self, run, warmups: int = 1) -> torch.cuda.CUDAGraph:
        """A CUDA graph of `run()` in the runner's memory pool (shared by every graph it captures).

        NOTE: `run` first runs `warmups` times on a side stream (Triton compiles, cuBLAS picks its kernels), as
        graph capture requires; capture itself executes nothing."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmups):
                run()
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            run()
        return graph

    def _load_graph(self, step: StepInput) -> _Graph:
        """The decode step's bucket graph with the step's ids, positions and metadata in its static inputs."""
        g = self._graph_for(self._bucket(len(step.seq_ids)))
        # NOTE: every input goes in as an asynchronous copy from pinned memory, so loading step n+1 never waits
        # for step n's replay (the engine's overlap); the copies are queued behind it on the same stream
        ids, pos, meta, _ = self._padded_decode(step, list(range(len(step.seq_ids))), g.batch, meta_on_host=True)
        g.meta.update_(meta)
        g.input_ids.copy_(ids.pin_memory(), non_blocking=True)
        g.positions.copy_(pos.pin_memory(), non_blocking=True)
        self._device_tokens(step, g.input_ids)
        return g

    def _execute_graph(self, step: StepInput) -> Tensor:
        g = self._load_graph(step)
        g.graph.replay()
        rows = step.sample_rows
        if rows == list(range(len(rows))):  # NOTE: the usual decode step: a view, no index tensor to copy over
            return g.logits[: len(rows)]  # [S, V]
        return _select_rows(g.logits, rows)  # [S, V]

    # ------------------------------------------------------------------ timing (msc profile)
    @contextlib.contextmanager
    def synthetic_decode(self, batch: int, context_len: int) -> Iterator[Callable[[], object]]:
        """A runnable decode step of `batch` made-up sequences at `context_len` tokens each (the cache holds
        whatever is in it; the step does a real one's work, its tokens spread over the vocabulary): with a
        colocated program's CUDA graph, the graph's replay (the step's host work left out); otherwise a whole
        `execute` call. The sequences are dropped on exit."""
        seq_ids = list(range(10_000_000, 10_000_000 + batch))  # ids no request uses
        for s in seq_ids:
            self.cache.add_sequence(s)
            self.cache.ensure(s, context_len + 1)
        try:
            step = StepInput(seq_ids, [context_len] * batch, [1] * batch,
                             decode_token_ids(batch, self._probe()["vocab"]), list(range(batch)))
            run = (lambda: self.execute(step))
            if self.cuda_graphs:
                run = self._load_graph(step).graph.replay  # the inputs stay: every replay is the same step
            yield run
        finally:
            for s in seq_ids:
                self.cache.drop_sequence(s)

    def time_decode(self, batch: int, context_len: int, steps: int = 20, warmup: int = 3) -> float:
        """Median seconds of one decode step of `batch` sequences at `context_len` tokens each (synthetic_decode:
        device events around a graph replay on a GPU, whole `execute` calls otherwise)."""
        with self.synthetic_decode(batch, context_len) as run:
            return self.median_seconds(run, steps, warmup)

    def median_seconds(self, run: Callable[[], object], steps: int, warmup: int = 3) -> float:
        """Median seconds of `steps` calls of run() after `warmup` (device events on a GPU)."""
        times = []
        for i in range(warmup + steps):
            if self.device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                run()
                b.record()
                b.synchronize()
                dt = a.elapsed_time(b) / 1e3
            else:
                t = time.perf_counter()
                run()
                dt = time.perf_counter() - t
            if i >= warmup:
                times.append(dt)
        return sorted(times)[len(times) // 2]
