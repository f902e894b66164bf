"""torch.distributed transport: point-to-point send/recv (gloo on CPU, NCCL on GPU), the baseline.

The same message format as the byte-stream transports (header from `wire.py`, then one tensor per
part), carried with `dist.isend` / `dist.irecv`: the header goes first so the receiver can allocate
the parts. This is what "just use torch.distributed" costs, kept as the reference the other
transports are measured against.

NOTE: gloo's point-to-point works only complete inside `Work.wait()` (`is_completed()` stays False
until then), so this endpoint cannot poll: progress blocks on the oldest receive someone waits for,
and on sends only when no receive is wanted, each wait bounded by the endpoint's timeout. Receives
are posted as soon as they are asked for, so the usual exchange patterns (send to all, then receive
from all) cannot deadlock; two peers that both wait on large sends before either receives can, until
the timeout: one of the reasons the M2N transports exist.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from msc.backends.comm import wire
from msc.backends.comm.m2n import DEFAULT_TIMEOUT_S, Endpoint, Handle, PeerError, TagMatch, _Recv
from msc.errors import MscError


class _Send(Handle):
    def __init__(self, endpoint, peer: int, works: list, keep: list[Tensor]):
        super().__init__(endpoint)
        self.peer, self.works, self.keep = peer, works, keep


class _Inbound:
    def __init__(self, device: torch.device):
        self.header = torch.empty(wire.HEADER_BYTES, dtype=torch.uint8, device=device)
        self.header_work = None
        self.seq = 0
        self.match = TagMatch()
        self.broken: Exception | None = None


def _finish(work, what: str, timeout_s: float) -> None:
    try:
        work.wait(timedelta(seconds=timeout_s))
    except RuntimeError as e:  # gloo reports a closed connection or its own timeout this way
        raise PeerError(f"torch_dist: {what} failed (peer dead or silent): {str(e).splitlines()[0]}") from None


class TorchDistEndpoint(Endpoint):
    transport = "torch_dist"
    # NOTE: gloo's point-to-point work objects never report completion before `wait()` (is_completed() stays
    # False), so progress here blocks on a peer that someone waits for; callers that wait for any of
    # several peers must make sure each of them sends soon (msc.runtime.exchange does)
    blocking_progress = True

    def __init__(self, rank: int, peers: Sequence[int], device="cpu", timeout_s: float = DEFAULT_TIMEOUT_S):
        if not dist.is_initialized():
            raise MscError("the torch_dist transport needs torch.distributed initialised (init_process_group)")
        super().__init__(rank, peers, timeout_s)
        self.device = torch.device(device)
        self._sends: list[_Send] = []
        self._out_seq = {p: 0 for p in self.peers}
        self._in = {p: _Inbound(self.device) for p in self.peers}

    def _check_peer(self, peer: int) -> None:
        if peer not in self._in:
            raise MscError(f"rank {self.rank} has no connection to rank {peer}; peers: {self.peers}")

    def isend(self, peer: int, tensors: Sequence[Tensor], tag: int = 0, *, flush: bool = True) -> Handle:
        self._check_peer(peer)
        keep = [t.contiguous() for t in tensors]
        words = wire.encode_header_for(self._out_seq[peer], tag, tuple((t.dtype, tuple(t.shape)) for t in keep))
        self._out_seq[peer] += 1
        header = torch.from_numpy(words).to(self.device)  # uint8 [HEADER_BYTES]
        keep.insert(0, header)
        works = [dist.isend(t, peer) for t in keep if t.numel()]
        h = _Send(self, peer, works, keep)
        self._sends.append(h)
        return h

    def _pull(self, peer: int, st: _Inbound) -> bool:
        """Read whole messages from `peer` (blocking) while someone waits for one that has not come."""
        moved = False
        while st.match.wanted():
            if st.header_work is None:
                st.header_work = dist.irecv(st.header, peer)
            _finish(st.header_work, f"receiving a header from rank {peer}", self.timeout_s)
            st.header_work = None
            try:
                tag, specs = wire.decode_header(st.header.cpu().numpy(), st.seq, f"rank {peer} (torch_dist)")
            except wire.CorruptMessage as e:
                st.broken = e  # the stream from this peer can no longer be trusted
                st.match.abandon()
                raise
            st.seq += 1
            parts = [torch.empty(s.shape, dtype=s.dtype, device=self.device) for s in specs]
            for w in [dist.irecv(t, peer) for t in parts if t.numel()]:
                _finish(w, f"receiving a message from rank {peer}", self.timeout_s)
            moved = True
            st.match.deliver(tag, parts)
        return moved

    def irecv(self, peer: int, tag: int = 0) -> Handle:
        self._check_peer(peer)
        h = _Recv(self, peer, tag)
        st = self._in[peer]
        if st.broken is not None:
            raise st.broken
        st.match.claim(h)
        if not h.done:
            if st.header_work is None:  # post the header receive now; it completes in a later wait
                st.header_work = dist.irecv(st.header, peer)
        return h

    def progress(self) -> bool:
        moved = False
        for peer, st in self._in.items():
            moved |= self._pull(peer, st)
        if not moved and self._sends:
            for h in self._sends:
                for w in h.works:
                    _finish(w, f"sending to rank {h.peer}", self.timeout_s)
                h.done, h.keep = True, None
            self._sends, moved = [], True
        return moved


def connect_torch_dist(rank: int, peers: list[int], *, device="cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> TorchDistEndpoint:
    """An endpoint over the default process group (already initialised by the role worker)."""
    return TorchDistEndpoint(rank, sorted(peers), device, timeout_s)
