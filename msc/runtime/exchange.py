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

A control message is [code, step, m, round, members]. Serving (msc.runtime.serving) adds a third code,
PARK: a replica with no request to work on says so, and repeats it as a heartbeat while it waits (an expert
node's bounded wait must not expire on a quiet server). The server hands out work in rounds; `members` is
the bit mask of the replicas (by index) working in the round, so that every expert node groups the same
replicas' forwards together.

NOTE: why rounds. An expert node runs a forward for the replicas whose FORWARD it holds, gathering each layer
from all of them. If a parked replica could rejoin at any time, one expert node might take it into its
current forward and another only into its next one; the replica then waits on the second node for a layer
that node will only run after the first node has seen the replica's next layer: a deadlock. So replicas
join only when all of them are parked, and every expert node waits for the FORWARD of every member the
round names before it starts; a replica leaves (PARK) in step, after its last forward.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from msc.backends.comm.m2n import Endpoint
from msc.errors import MscError

CTRL_DONE, CTRL_FORWARD, CTRL_PARK = 0, 1, 2
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
        self.round, self.members = 0, 0  # the serving round this replica works in and its member mask
        self.trace = None  # msc.runtime.trace.Trace, set by the role

    def start_round(self, round_id: int, members: list[int]) -> None:
        """Serving: the next forwards belong to round `round_id`, worked on by the replicas with these indices."""
        self.round, self.members = round_id, sum(1 << i for i in set(members))

    def begin_forward(self, microbatches: int = 1) -> None:
        """Tell every expert node that a forward of `microbatches` micro-batches follows."""
        if not 1 <= microbatches <= MAX_MICROBATCHES:
            raise MscError(f"a forward has 1 to {MAX_MICROBATCHES} micro-batches, got {microbatches}")
        self._control(CTRL_FORWARD, microbatches)

    def park(self) -> None:
        """Tell every expert node that no forward of this replica follows until its next `begin_forward`
        (a serving replica waiting for requests; repeated as a heartbeat while it waits)."""
        self._control(CTRL_PARK, 0)

    def finish(self) -> None:
        """Tell every expert node that this replica sends no more forwards."""
        self._control(CTRL_DONE, 0)
        self.ep.wait_all(self._sends)
        self._sends = []

    def _control(self, code: int, microbatches: int) -> None:
        msg = torch.tensor([code, self.step, microbatches, self.round, self.members], dtype=torch.int64, device=self.device)
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
        self.attention_ranks = list(attention_ranks)
        self.active = list(attention_ranks)
        self.microbatches_of: dict[int, int] = {}  # replica rank -> its micro-batches this forward
        self.microbatches = 0  # the most any replica sends this forward
        self.parked: dict[int, object] = {}  # parked replica rank -> its posted control receive
        self._posted: dict[tuple[int, int], list] = {}  # (layer, mb) -> [(replica, handle)]
        self._sources: dict[tuple[int, int], list[tuple[int, int]]] = {}
        self._sends: list = []
        self.mb = 0
        self.trace = None  # msc.runtime.trace.Trace, set by the role

    def begin_forward(self) -> bool:
        """Wait until a forward starts (one control message from every active replica); False once every
        replica is done. When every replica left is parked (serving, between rounds), wait for the next
        round instead (`_next_round`)."""
        counts: dict[int, int] = {}
        handles = [self.ep.irecv(r, CONTROL_TAG) for r in self.active]
        for r, h in zip(self.active, handles):
            code, m, _, _ = self._read_control(r, h)
            if code == CTRL_FORWARD:
                counts[r] = m
            elif code == CTRL_PARK:
                self.parked[r] = self.ep.irecv(r, CONTROL_TAG)
        if not counts and self.parked:
            counts = self._next_round()
        self.active, self.microbatches_of = sorted(counts), counts
        self.microbatches = max(counts.values(), default=0)
        if not counts:
            self.ep.wait_all(self._sends)
        return bool(counts)

    def _next_round(self) -> dict[int, int]:
        """Every replica left is parked: wait for the first FORWARD of a round, then for the FORWARD of every
        other member it names (heartbeats absorbed on the way); {r: m} of the members, {} if all are done.

        NOTE: each wait is the endpoint's bounded one; parked replicas send a heartbeat well within it, so only
        a dead or silent replica makes it fail."""
        members: list[int] | None = None
        round_id, counts = None, {}
        while True:
            waiting = list(self.parked) if members is None else [r for r in members if r not in counts]
            if not waiting:
                return counts
            missing = [r for r in waiting if r not in self.parked]
            if missing:
                raise MscError(f"round {round_id} names rank(s) {missing}, which already ended")
            r = waiting[self.ep.wait_any([self.parked[r] for r in waiting])]
            code, m, rnd, mask = self._read_control(r, self.parked.pop(r))
            if code == CTRL_PARK:
                self.parked[r] = self.ep.irecv(r, CONTROL_TAG)
            elif code == CTRL_DONE:
                if members is not None:
                    raise MscError(f"rank {r} ended while round {round_id} was starting")
            elif members is None:
                members = [a for i, a in enumerate(self.attention_ranks) if mask >> i & 1]
                round_id = rnd
                if r not in members:
                    raise MscError(f"rank {r} started round {rnd} without being one of its members {members}")
                counts[r] = m
            elif rnd != round_id:
                raise MscError(f"rank {r} started round {rnd} while round {round_id} of ranks {members} was starting")
            else:
                counts[r] = m

    def _read_control(self, r: int, h) -> tuple[int, int, int, int]:
        """(code, micro-batches, round, members) of replica r's control message (handle h)."""
        (msg,) = self.ep.wait_all([h])[0]
        vals = msg.tolist() if msg.numel() == 5 else [-1, 0, 0, 0, 0]
        h.release()
        code, m = int(vals[0]), int(vals[2])
        if not (code == CTRL_FORWARD and 1 <= m <= MAX_MICROBATCHES) and code not in (CTRL_PARK, CTRL_DONE):
            raise MscError(f"corrupted control message from rank {r}: {msg.tolist()}")
        return code, m, int(vals[3]), int(vals[4])

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
