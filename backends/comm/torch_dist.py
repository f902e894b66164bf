"""M2N over torch.distributed point-to-point (gloo on CPU, NCCL on GPU): the baseline transport.

Wire protocol, per forward and per MoE layer (all int64 headers):
  attention -> each expert node:  control [FORWARD|DONE, step]       once per forward
  attention -> expert node j:     header [n_j, layer], then hidden [n_j, H], index [n_j, K], weights [n_j, K] (f32)
  expert node j -> attention:     outputs [n_j, H] (the partial sum over the experts node j holds)
Only the tokens that picked at least one of node j's experts go to node j (n_j may be 0: header only).
Every wait is bounded by the process group's timeout; a peer that dies closes its connection, which
surfaces here as an error naming the peer.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from msc.errors import MscError

CTRL_DONE, CTRL_FORWARD = 0, 1
MAX_TOKENS = 1 << 24


def _wait_all(works, what: str) -> None:
    for w in works:
        try:
            w.wait()
        except RuntimeError as e:
            raise MscError(f"{what} failed: {str(e).splitlines()[0]}") from None


def _recv(buf: Tensor, src: int, what: str) -> Tensor:
    try:
        dist.recv(buf, src)
    except RuntimeError as e:
        raise MscError(f"receiving {what} from rank {src} failed (peer dead or silent): {str(e).splitlines()[0]}") from None
    return buf


class AttentionSideComm:
    """The attention replica's end: send tokens to expert nodes, gather their partial outputs back."""

    def __init__(self, expert_ranks: list[int]):
        self.expert_ranks = expert_ranks
        self._pending: dict[int, list[tuple[int, Tensor]]] = {}
        self.step = 0

    def begin_forward(self) -> None:
        """Tell every expert node that a forward follows."""
        self._control(CTRL_FORWARD)

    def finish(self) -> None:
        """Tell every expert node that this replica sends no more forwards."""
        self._control(CTRL_DONE)

    def _control(self, code: int) -> None:
        msg = torch.tensor([code, self.step], dtype=torch.int64)
        _wait_all([dist.isend(msg, r) for r in self.expert_ranks], "sending control to the expert nodes")
        self.step += 1

    def dispatch(self, hidden: Tensor, idx: Tensor, weights: Tensor, layer: int, bounds: list[int]) -> Tensor:
        if len(bounds) != len(self.expert_ranks) + 1:
            raise MscError(f"layer {layer}: placement has {len(bounds) - 1} expert nodes, the run has {len(self.expert_ranks)}")
        works, keep, pending = [], [], []
        for j, rank in enumerate(self.expert_ranks):
            lo, hi = bounds[j], bounds[j + 1]
            tok = ((idx >= lo) & (idx < hi)).any(dim=-1).nonzero().squeeze(1)  # [n_j]
            header = torch.tensor([tok.numel(), layer], dtype=torch.int64)
            msgs = [header]
            if tok.numel():
                msgs += [hidden[tok].contiguous(), idx[tok].contiguous(), weights[tok].float().contiguous()]
            works += [dist.isend(m, rank) for m in msgs]
            keep += msgs  # isend needs its buffers alive until the wait below
            pending.append((rank, tok))
        _wait_all(works, f"dispatch of layer {layer}")
        self._pending[layer] = pending
        return torch.tensor([layer], dtype=torch.int64)

    def combine(self, ticket: Tensor, hidden: Tensor, layer: int) -> Tensor:
        out = torch.zeros_like(hidden)  # [T, H]
        for rank, tok in self._pending.pop(layer):
            if tok.numel():
                part = _recv(hidden.new_empty(tok.numel(), hidden.shape[1]), rank, f"layer {layer} expert outputs")
                out.index_add_(0, tok, part)
        return out


class ExpertSideComm:
    """The expert node's end: gather a layer's tokens from every active attention replica, send results back."""

    def __init__(self, attention_ranks: list[int]):
        self.active = list(attention_ranks)
        self._sources: list[tuple[int, int]] = []

    def begin_forward(self) -> bool:
        """Wait for every active replica's control message; False once all of them are done."""
        still = []
        for r in self.active:
            msg = _recv(torch.empty(2, dtype=torch.int64), r, "control")
            code = int(msg[0])
            if code == CTRL_FORWARD:
                still.append(r)
            elif code != CTRL_DONE:
                raise MscError(f"corrupted control message from rank {r}: code {code}")
        self.active = still
        return bool(still)

    def expert_recv(self, layer: int, hidden_size: int, top_k: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        xs, ids, ws, self._sources = [], [], [], []
        for r in self.active:
            n, got_layer = (int(v) for v in _recv(torch.empty(2, dtype=torch.int64), r, f"layer {layer} header"))
            if got_layer != layer or not 0 <= n <= MAX_TOKENS:
                raise MscError(f"corrupted header from rank {r}: tokens={n} layer={got_layer}, expected layer {layer}")
            if n:
                xs.append(_recv(torch.empty(n, hidden_size, dtype=dtype), r, f"layer {layer} hidden states"))
                ids.append(_recv(torch.empty(n, top_k, dtype=torch.int64), r, f"layer {layer} expert ids"))
                ws.append(_recv(torch.empty(n, top_k, dtype=torch.float32), r, f"layer {layer} expert weights"))
            self._sources.append((r, n))
        if not xs:
            return (torch.empty(0, hidden_size, dtype=dtype), torch.empty(0, top_k, dtype=torch.int64),
                    torch.empty(0, top_k, dtype=torch.float32))
        return torch.cat(xs), torch.cat(ids), torch.cat(ws)

    def expert_send(self, hidden: Tensor, layer: int) -> None:
        works, keep, start = [], [], 0
        for r, n in self._sources:
            if n:
                part = hidden[start : start + n].contiguous()
                keep.append(part)
                works.append(dist.isend(part, r))
            start += n
        _wait_all(works, f"sending layer {layer} expert outputs")
