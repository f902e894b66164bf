"""The per-layer token exchange of the two roles, over any M2N endpoint (backends/comm): steps, not rounds.

Wire protocol. Every message from an attention replica to an expert node goes under one tag (DATA_TAG)
and starts with a header [kind, step, layer, mb, n, m] (int64; m: the step's micro-batch count):
  DATA       + hidden [n, H], top-k ids [n, K], top-k weights [n, K] f32: micro-batch `mb` of the replica's
               step `step` at MoE layer `layer`, only the n >= 1 tokens that picked one of the node's experts
  HEARTBEAT  the replica is alive and has nothing for this node now (sent when it has been quiet a while)
  DONE       the replica sends nothing more
  DEVICE     run the replica's step `step` (an epoch) through the device exchange, n rows per micro-batch,
             m micro-batches, mb = 1 when it is a prompt or mixed step run eagerly (msc.runtime.device_exchange:
             the tokens move through GPU memory)
The expert node answers each DATA message with the partial sum over its experts, outputs [n, H], under the
tag data_tag(layer, mb) (a replica has at most one message per (layer, mb) in flight: it combines every
layer of a step before the next step dispatches it again).

An expert node is a loop over whatever has arrived: it takes the oldest waiting message, gathers every
other waiting message of the same layer (from any replica, any micro-batch, any step), runs its experts on
them as one batch and answers each. Membership of a batch is exactly the messages in it, never inferred
from a timeout or a round: replicas start and stop steps independently, a replica with nothing to do
costs the expert nodes nothing, and a replica whose tokens miss a node sends that node nothing.

NOTE: why no barrier. The previous design grouped the replicas' forwards into rounds so that each expert
node waited for every member before a layer; that needed every replica to join and leave together (a
request arriving mid-round waited for the round). A node that only ever runs what has arrived cannot
deadlock: every message it holds is answered after at most one batch of each other layer, whatever the
replicas do. Tokens of replicas that reach a layer at about the same time still share a batch, because
the node's own compute time lets them queue up.
"""
from __future__ import annotations

import contextlib
import time

import torch
from torch import Tensor

from msc.backends.comm.m2n import Endpoint
from msc.errors import MscError

DATA_TAG = -1
KIND_DATA, KIND_HEARTBEAT, KIND_DONE, KIND_DEVICE = 1, 2, 0, 3
DEVICE_LAYER = -1  # next_layer()'s answer for a device step (its message in ExpertExchange.device_msg)
MAX_MICROBATCHES = 8


def data_tag(layer: int, mb: int) -> int:
    """The tag of the expert node's answer for micro-batch `mb` of `layer`."""
    return layer * MAX_MICROBATCHES + mb


class AttentionExchange:
    """The attention replica's end: send tokens to expert nodes, gather their partial outputs back."""

    def __init__(self, endpoint: Endpoint, expert_ranks: list[int], device="cpu", heartbeat_s: float = 10.0):
        self.ep, self.expert_ranks, self.device = endpoint, expert_ranks, torch.device(device)
        self._pending: dict[tuple[int, int], list] = {}
        self._sends: list = []
        self.step, self.mb, self.microbatches = 0, 0, 1
        self.blocking = getattr(endpoint, "blocking_progress", False)
        self.heartbeat_s = min(heartbeat_s, 0.05) if self.blocking else heartbeat_s
        self._last_sent = {r: time.monotonic() for r in expert_ranks}
        self.trace = None  # msc.runtime.trace.Trace, set by the runner

    def begin_step(self, step: int, microbatches: int) -> None:
        if not 1 <= microbatches <= MAX_MICROBATCHES:
            raise MscError(f"a step has 1 to {MAX_MICROBATCHES} micro-batches, got {microbatches}")
        self.step, self.microbatches = step, microbatches

    def _header(self, kind: int, layer: int = 0, n: int = 0) -> Tensor:
        return torch.tensor([kind, self.step, layer, self.mb, n, self.microbatches], dtype=torch.int64, device=self.device)

    def dispatch(self, hidden: Tensor, idx: Tensor, weights: Tensor, layer: int, bounds: list[int]) -> Tensor:
        if len(bounds) != len(self.expert_ranks) + 1:
            raise MscError(f"layer {layer}: placement has {len(bounds) - 1} expert nodes, the run has {len(self.expert_ranks)}")
        self._sends = [h for h in self._sends if not h.done]
        pending = []
        tag, now = data_tag(layer, self.mb), time.monotonic()
        with _span(self.trace, "send", "dispatch", layer, self.mb):
            for j, rank in enumerate(self.expert_ranks):
                lo, hi = bounds[j], bounds[j + 1]
                tok = ((idx >= lo) & (idx < hi)).any(dim=-1).nonzero().squeeze(1)  # [n_j]
                n = tok.numel()
                if n == 0 and not self.blocking:
                    continue  # nothing for this node: it hears nothing (and owes nothing back)
                parts = [self._header(KIND_DATA, layer, n), hidden[tok], idx[tok], weights[tok].float()]
                self._sends.append(self.ep.isend(rank, parts, DATA_TAG, flush=False))
                self._last_sent[rank] = now
                # Post the receive now: the results may arrive in any order relative to other traffic.
                pending.append((tok, self.ep.irecv(rank, tag)))
            self.ep.flush()  # one doorbell per expert node, after all of this layer's tokens are written
        self._pending[(layer, self.mb)] = pending
        return torch.tensor([layer], dtype=torch.int64)

    def combine(self, ticket: Tensor, hidden: Tensor, layer: int) -> Tensor:
        pending = self._pending.pop((layer, self.mb))
        with _span(self.trace, "wait", "combine wait", layer, self.mb):
            self.ep.wait_all([h for _, h in pending])
        out = torch.zeros_like(hidden)  # [T, H]
        for tok, h in pending:
            (part,) = h.result  # [n_j, H]
            if part.shape != (tok.numel(), hidden.shape[1]):
                raise MscError(f"layer {layer}: an expert node returned {tuple(part.shape)}, expected {(tok.numel(), hidden.shape[1])}")
            out.index_add_(0, tok, part.to(hidden.dtype))
            h.release()  # the partial sums were read (possibly in place in the receive buffer): give it back
        return out

    def device_step(self, epoch: int, rows: int, microbatches: int, eager: bool = False) -> None:
        """Tell every expert node to run its side of a device-exchange step; returns once the messages are out
        (the step's graph, queued after this, waits on the nodes). The header's mb field carries `eager`."""
        msg, now = torch.tensor([KIND_DEVICE, epoch, DEVICE_LAYER, int(eager), rows, microbatches], dtype=torch.int64,
                                device=self.device), time.monotonic()
        sends = [self.ep.isend(r, [msg], DATA_TAG, flush=False) for r in self.expert_ranks]
        for r in self.expert_ranks:
            self._last_sent[r] = now
        self.ep.flush()
        self.ep.wait_all(sends)

    def heartbeat(self, force: bool = False) -> None:
        """Tell the expert nodes this replica is alive, to those not sent anything for heartbeat_s (all if
        force): their bounded waits must not expire while a replica is quiet or its tokens miss them."""
        now = time.monotonic()
        quiet = [r for r in self.expert_ranks if force or now - self._last_sent[r] >= self.heartbeat_s]
        if quiet:
            self._control(KIND_HEARTBEAT, quiet)

    def finish(self) -> None:
        """Tell every expert node that this replica sends no more."""
        self._control(KIND_DONE, self.expert_ranks)
        self.ep.wait_all(self._sends)
        self._sends = []

    def _control(self, kind: int, ranks: list[int]) -> None:
        self._sends = [h for h in self._sends if not h.done]
        msg, now = self._header(kind), time.monotonic()
        for r in ranks:
            self._sends.append(self.ep.isend(r, [msg], DATA_TAG, flush=False))
            self._last_sent[r] = now
        self.ep.flush()


class _Message:
    __slots__ = ("replica", "step", "layer", "mb", "n", "m", "parts", "handle")

    def __init__(self, replica, step, layer, mb, n, m, parts, handle):
        self.replica, self.step, self.layer, self.mb, self.n, self.m = replica, step, layer, mb, n, m
        self.parts, self.handle = parts, handle


class ExpertExchange:
    """The expert node's end: take whatever the replicas sent, a layer at a time; answer each message."""

    def __init__(self, endpoint: Endpoint, attention_ranks: list[int], device="cpu"):
        self.ep, self.device = endpoint, torch.device(device)
        self._rx = {r: self.ep.irecv(r, DATA_TAG) for r in attention_ranks}  # one posted receive per live replica
        self._waiting: list[_Message] = []  # arrived, not yet run (arrival order)
        self._batch: list[_Message] = []
        self._sends: list = []
        self.mb, self.microbatches = 0, 1  # of the batch being run (its first message's)
        self.device_msg: _Message | None = None  # the device step next_layer() returned DEVICE_LAYER for
        self.trace = None  # msc.runtime.trace.Trace, set by the role

    @property
    def live(self) -> list[int]:
        return list(self._rx)

    def next_layer(self) -> int | None:
        """Wait for work; the layer of the next batch (every waiting message of the oldest one's layer), or
        None once every replica is done."""
        self._collect(block=not self._waiting)
        if not self._waiting:
            self.ep.wait_all(self._sends)
            return None
        layer = self._waiting[0].layer
        if layer == DEVICE_LAYER:  # one replica's whole step, run by the node's device steps
            self.device_msg = self._waiting.pop(0)
            return layer
        self._batch = [m for m in self._waiting if m.layer == layer]
        self._waiting = [m for m in self._waiting if m.layer != layer]
        self.mb = self._batch[0].mb
        self.microbatches = self._batch[0].m
        return layer

    def _collect(self, block: bool) -> None:
        """Take in every message that has arrived (when `block`, first wait until there is work or every
        replica is done; heartbeats alone do not count as work)."""
        while self._rx:
            if block and not self._waiting:
                with _span(self.trace, "wait", "wait for tokens"):
                    ranks = list(self._rx)
                    self.ep.wait_any([self._rx[r] for r in ranks])
            else:
                self.ep.progress()
            for r in list(self._rx):
                h = self._rx[r]
                while h is not None and h.done:
                    h = self._take(r, h)
            if self._waiting or not block:
                return

    def _take(self, r: int, h):
        """Read replica r's arrived message (handle h); returns the next posted receive (None: r is done)."""
        parts = h.result
        head = parts[0]
        if head.dtype != torch.int64 or head.shape != (6,):
            raise MscError(f"rank {r} sent a message whose header is {head.dtype} {tuple(head.shape)}; expected int64 [6]")
        kind, step, layer, mb, n, m = head.tolist()
        if kind == KIND_DONE:
            h.release()
            del self._rx[r]
            return None
        nxt = self._rx[r] = self.ep.irecv(r, DATA_TAG)
        if kind == KIND_HEARTBEAT:
            h.release()
            return nxt
        if kind == KIND_DEVICE and len(parts) == 1 and layer == DEVICE_LAYER and 1 <= m <= MAX_MICROBATCHES and n >= 1 \
                and mb in (0, 1):
            h.release()
            self._waiting.append(_Message(r, step, layer, mb, n, m, None, None))  # mb: eager (1) or not
            return nxt
        if kind != KIND_DATA or len(parts) != 4 or not 0 <= mb < m <= MAX_MICROBATCHES:
            raise MscError(f"rank {r} sent a corrupted message: header {[kind, step, layer, mb, n, m]}, {len(parts)} parts")
        self._waiting.append(_Message(r, step, layer, mb, n, m, parts[1:], h))
        return nxt

    def expert_recv(self, layer: int, hidden_size: int, top_k: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        msgs = self._batch
        if not msgs or msgs[0].layer != layer:
            raise MscError(f"the expert program asked for layer {layer}, but the batch holds layer "
                           f"{msgs[0].layer if msgs else None}")
        for m in msgs:
            x, ids, w = m.parts
            n = m.n
            if x.shape != (n, hidden_size) or ids.shape != (n, top_k) or w.shape != (n, top_k) or x.dtype != dtype:
                raise MscError(
                    f"layer {layer}: rank {m.replica} sent hidden {tuple(x.shape)} {x.dtype}, ids {tuple(ids.shape)}, weights "
                    f"{tuple(w.shape)}; expected [n, {hidden_size}] {dtype} and [n, {top_k}]"
                )
        if len(msgs) == 1:
            x, ids, w = msgs[0].parts
            batch = x.clone(), ids.clone(), w.clone()
        else:
            batch = tuple(torch.cat([m.parts[i] for m in msgs]) for i in range(3))
        for m in msgs:  # the batch above is a copy: the receive buffers can be reused
            m.handle.release()
            m.parts = None
        return batch

    def expert_send(self, hidden: Tensor, layer: int) -> None:
        self._sends = [h for h in self._sends if not h.done]
        start = 0
        with _span(self.trace, "send", "expert send", layer, self.mb):
            for m in self._batch:
                self._sends.append(self.ep.isend(m.replica, [hidden[start : start + m.n]], data_tag(layer, m.mb), flush=False))
                start += m.n
            self.ep.flush()
        self._batch = []


def _span(trace, cat: str, name: str, layer: int | None = None, mb: int | None = None):
    return trace.span(cat, name, layer, mb) if trace is not None else contextlib.nullcontext()
