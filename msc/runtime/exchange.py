"""The per-layer token exchange of the two roles, over any M2N endpoint (backends/comm).

Wire protocol, one message per (sender, receiver, tag):
  attention -> each expert node:  tag CONTROL, [code FORWARD|DONE, step, m]     once per forward (m micro-batches)
  attention -> expert node j:     tag (layer, mb), [hidden [n_j, H], ids [n_j, K], weights [n_j, K] f32]
  expert node j -> attention:     tag (layer, mb), [outputs [n_j, H]] (the partial sum over node j's experts)
Only the tokens that picked at least one of node j's experts go to node j (n_j may be 0: the message
still goes, so the expert node knows this replica has nothing for it). Each replica may split a step
into its own number of micro-batches m_r; an expert node gathers micro-batch i of a layer from the
replicas with m_r > i.

Both ends keep a current micro-batch `mb`, set by the role before it runs a stage of that micro-batch.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from msc.backends.comm.m2n import Endpoint
from msc.errors import MscError

CTRL_DONE, CTRL_FORWARD = 0, 1
CONTROL_TAG = -1
MAX_MICROBATCHES = 8


def data_tag(layer: int, mb: int) -> int:
    """The message tag of micro-batch `mb`'s tokens (and results) of `layer`."""
    return layer * MAX_MICROBATCHES + mb


class AttentionExchange:
    """The attention replica's end: send tokens to expert nodes, gather their partial outputs back."""

    def __init__(self, endpoint: Endpoint, expert_ranks: list[int], device="cpu"):
        self.ep, self.expert_ranks, self.device = endpoint, expert_ranks, torch.device(device)
        self._pending: dict[tuple[int, int], list] = {}
        self._sends: list = []
        self.step = 0
        self.mb = 0
        self.trace = None  # msc.runtime.trace.Trace, set by the role

    def begin_forward(self, microbatches: int = 1) -> None:
        """Tell every expert node that a forward of `microbatches` micro-batches follows."""
        if not 1 <= microbatches <= MAX_MICROBATCHES:
            raise MscError(f"a forward has 1 to {MAX_MICROBATCHES} micro-batches, got {microbatches}")
        self._control(CTRL_FORWARD, microbatches)

    def finish(self) -> None:
        """Tell every expert node that this replica sends no more forwards."""
        self._control(CTRL_DONE, 0)
        self.ep.wait_all(self._sends)
        self._sends = []

    def _control(self, code: int, microbatches: int) -> None:
        msg = torch.tensor([code, self.step, microbatches], dtype=torch.int64, device=self.device)
        self._sends = [h for h in self._sends if not h.done]
        self._sends += [self.ep.isend(r, [msg], CONTROL_TAG, flush=False) for r in self.expert_ranks]
        self.ep.flush()
        self.step += 1

    def dispatch(self, hidden: Tensor, idx: Tensor, weights: Tensor, layer: int, bounds: list[int]) -> Tensor:
        if len(bounds) != len(self.expert_ranks) + 1:
            raise MscError(f"layer {layer}: placement has {len(bounds) - 1} expert nodes, the run has {len(self.expert_ranks)}")
        pending = []
        tag = data_tag(layer, self.mb)
        with _span(self.trace, "send", "dispatch", layer, self.mb):
            for j, rank in enumerate(self.expert_ranks):
                lo, hi = bounds[j], bounds[j + 1]
                tok = ((idx >= lo) & (idx < hi)).any(dim=-1).nonzero().squeeze(1)  # [n_j]
                self._sends.append(self.ep.isend(rank, [hidden[tok], idx[tok], weights[tok].float()], tag, flush=False))
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
            if tok.numel():
                out.index_add_(0, tok, part.to(hidden.dtype))
            h.release()  # the partial sums were read (possibly in place in the receive buffer): give it back
        self._sends = [h for h in self._sends if not h.done]
        return out


class ExpertExchange:
    """The expert node's end: gather a layer's tokens from every active attention replica, send results back."""

    def __init__(self, endpoint: Endpoint, attention_ranks: list[int], device="cpu"):
        self.ep, self.device = endpoint, torch.device(device)
        self.active = list(attention_ranks)
        self.microbatches_of: dict[int, int] = {}  # replica rank -> its micro-batches this forward
        self.microbatches = 0  # the most any replica sends this forward
        self._posted: dict[tuple[int, int], list] = {}  # (layer, mb) -> [(replica, handle)]
        self._sources: dict[tuple[int, int], list[tuple[int, int]]] = {}
        self._sends: list = []
        self.mb = 0
        self.trace = None  # msc.runtime.trace.Trace, set by the role

    def begin_forward(self) -> bool:
        """Wait for every active replica's control message; False once all of them are done."""
        handles = [self.ep.irecv(r, CONTROL_TAG) for r in self.active]
        msgs = self.ep.wait_all(handles)
        still, counts = [], {}
        for r, (msg,), h in zip(self.active, msgs, handles):
            code, m = (int(msg[0]), int(msg[2])) if msg.numel() == 3 else (-1, 0)
            h.release()
            if code == CTRL_FORWARD and 1 <= m <= MAX_MICROBATCHES:
                still.append(r)
                counts[r] = m
            elif code != CTRL_DONE:
                raise MscError(f"corrupted control message from rank {r}: {msg.tolist()}")
        self.active, self.microbatches_of = still, counts
        self.microbatches = max(counts.values(), default=0)
        if not still:
            self.ep.wait_all(self._sends)
        return bool(still)

    def _post(self, layer: int, mb: int) -> list:
        key = (layer, mb)
        if key not in self._posted:
            tag = data_tag(layer, mb)
            self._posted[key] = [(r, self.ep.irecv(r, tag)) for r in self.active if self.microbatches_of[r] > mb]
        return self._posted[key]

    def wait_ready(self, items: list[tuple[int, int]]) -> int:
        """Index of an item (layer, mb) whose tokens have arrived from every replica that sends it."""
        return self.ep.wait_any_group([[h for _, h in self._post(layer, mb)] for layer, mb in items])

    def expert_recv(self, layer: int, hidden_size: int, top_k: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        posted = self._post(layer, self.mb)
        del self._posted[(layer, self.mb)]
        handles = [h for _, h in posted]
        with _span(self.trace, "recv", "expert recv", layer, self.mb):
            msgs = self.ep.wait_all(handles)
        sources = self._sources[(layer, self.mb)] = []
        for (r, _), parts in zip(posted, msgs):
            x, ids, w = parts
            n = x.shape[0]
            if x.shape != (n, hidden_size) or ids.shape != (n, top_k) or w.shape != (n, top_k) or x.dtype != dtype:
                raise MscError(
                    f"layer {layer}: rank {r} sent hidden {tuple(x.shape)} {x.dtype}, ids {tuple(ids.shape)}, weights "
                    f"{tuple(w.shape)}; expected [n, {hidden_size}] {dtype} and [n, {top_k}]"
                )
            sources.append((r, n))
        batch = torch.cat([m[0] for m in msgs]), torch.cat([m[1] for m in msgs]), torch.cat([m[2] for m in msgs])
        for h in handles:  # the batch above is a copy: the receive buffers can be reused
            h.release()
        return batch

    def expert_send(self, hidden: Tensor, layer: int) -> None:
        self._sends = [h for h in self._sends if not h.done]
        start, tag = 0, data_tag(layer, self.mb)
        with _span(self.trace, "send", "expert send", layer, self.mb):
            for r, n in self._sources.pop((layer, self.mb)):
                self._sends.append(self.ep.isend(r, [hidden[start : start + n]], tag, flush=False))
                start += n
            self.ep.flush()


def _span(trace, cat: str, name: str, layer: int, mb: int):
    return trace.span(cat, name, layer, mb) if trace is not None else contextlib.nullcontext()
