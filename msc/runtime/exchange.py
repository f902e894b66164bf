"""The per-layer token exchange of the two roles, over any M2N endpoint (backends/comm).

Wire protocol, one message per (sender, receiver, tag):
  attention -> each expert node:  tag CONTROL, [code FORWARD|DONE, step]           once per forward
  attention -> expert node j:     tag = layer, [hidden [n_j, H], ids [n_j, K], weights [n_j, K] f32]
  expert node j -> attention:     tag = layer, [outputs [n_j, H]] (the partial sum over node j's experts)
Only the tokens that picked at least one of node j's experts go to node j (n_j may be 0: the message
still goes, so the expert node knows this replica has nothing for it).
"""
from __future__ import annotations

import torch
from torch import Tensor

from msc.backends.comm.m2n import Endpoint
from msc.errors import MscError

CTRL_DONE, CTRL_FORWARD = 0, 1
CONTROL_TAG = -1


class AttentionExchange:
    """The attention replica's end: send tokens to expert nodes, gather their partial outputs back."""

    def __init__(self, endpoint: Endpoint, expert_ranks: list[int], device="cpu"):
        self.ep, self.expert_ranks, self.device = endpoint, expert_ranks, torch.device(device)
        self._pending: dict[int, list] = {}
        self._sends: list = []
        self.step = 0

    def begin_forward(self) -> None:
        """Tell every expert node that a forward follows."""
        self._control(CTRL_FORWARD)

    def finish(self) -> None:
        """Tell every expert node that this replica sends no more forwards."""
        self._control(CTRL_DONE)
        self.ep.wait_all(self._sends)
        self._sends = []

    def _control(self, code: int) -> None:
        msg = torch.tensor([code, self.step], dtype=torch.int64, device=self.device)
        self._sends = [h for h in self._sends if not h.done]
        self._sends += [self.ep.isend(r, [msg], CONTROL_TAG, flush=False) for r in self.expert_ranks]
        self.ep.flush()
        self.step += 1

    def dispatch(self, hidden: Tensor, idx: Tensor, weights: Tensor, layer: int, bounds: list[int]) -> Tensor:
        if len(bounds) != len(self.expert_ranks) + 1:
            raise MscError(f"layer {layer}: placement has {len(bounds) - 1} expert nodes, the run has {len(self.expert_ranks)}")
        pending = []
        for j, rank in enumerate(self.expert_ranks):
            lo, hi = bounds[j], bounds[j + 1]
            tok = ((idx >= lo) & (idx < hi)).any(dim=-1).nonzero().squeeze(1)  # [n_j]
            self._sends.append(self.ep.isend(rank, [hidden[tok], idx[tok], weights[tok].float()], layer, flush=False))
            # Post the receive now: the results may arrive in any order relative to other layers' traffic.
            pending.append((tok, self.ep.irecv(rank, layer)))
        self.ep.flush()  # one doorbell per expert node, after all of this layer's tokens are written
        self._pending[layer] = pending
        return torch.tensor([layer], dtype=torch.int64)

    def combine(self, ticket: Tensor, hidden: Tensor, layer: int) -> Tensor:
        pending = self._pending.pop(layer)
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
        self._sources: list[tuple[int, int]] = []
        self._sends: list = []

    def begin_forward(self) -> bool:
        """Wait for every active replica's control message; False once all of them are done."""
        handles = [self.ep.irecv(r, CONTROL_TAG) for r in self.active]
        msgs = self.ep.wait_all(handles)
        still = []
        for r, (msg,), h in zip(self.active, msgs, handles):
            code = int(msg[0]) if msg.numel() == 2 else -1
            h.release()
            if code == CTRL_FORWARD:
                still.append(r)
            elif code != CTRL_DONE:
                raise MscError(f"corrupted control message from rank {r}: {msg.tolist()}")
        self.active = still
        if not still:
            self.ep.wait_all(self._sends)
        return bool(still)

    def expert_recv(self, layer: int, hidden_size: int, top_k: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        handles = [self.ep.irecv(r, layer) for r in self.active]
        msgs = self.ep.wait_all(handles)
        self._sources = []
        for r, parts in zip(self.active, msgs):
            x, ids, w = parts
            n = x.shape[0]
            if x.shape != (n, hidden_size) or ids.shape != (n, top_k) or w.shape != (n, top_k) or x.dtype != dtype:
                raise MscError(
                    f"layer {layer}: rank {r} sent hidden {tuple(x.shape)} {x.dtype}, ids {tuple(ids.shape)}, weights "
                    f"{tuple(w.shape)}; expected [n, {hidden_size}] {dtype} and [n, {top_k}]"
                )
            self._sources.append((r, n))
        batch = torch.cat([m[0] for m in msgs]), torch.cat([m[1] for m in msgs]), torch.cat([m[2] for m in msgs])
        for h in handles:  # the batch above is a copy: the receive buffers can be reused
            h.release()
        return batch

    def expert_send(self, hidden: Tensor, layer: int) -> None:
        self._sends = [h for h in self._sends if not h.done]
        start = 0
        for r, n in self._sources:
            self._sends.append(self.ep.isend(r, [hidden[start : start + n]], layer, flush=False))
            start += n
        self.ep.flush()
