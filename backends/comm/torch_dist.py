"""torch.distributed transport: point-to-point send/recv (gloo on CPU, NCCL on GPU), the baseline.

The same message format as the byte-stream transports (header from `wire.py`, then one tensor per
part), carried with `dist.isend` / `dist.irecv`: the header goes first so the receiver can allocate
the parts. Every operation is non-blocking and polled with `Work.is_completed()`, so waits share the
endpoint's timeout and error reporting. This is what "just use torch.distributed" costs, kept as the
reference the other transports are measured against.
"""
from __future__ import annotations

from collections import deque
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from msc.backends.comm import wire
from msc.backends.comm.m2n import DEFAULT_TIMEOUT_S, Endpoint, Handle, PeerError
from msc.errors import MscError


class _Send(Handle):
    def __init__(self, endpoint, peer: int, works: list, keep: list[Tensor]):
        super().__init__(endpoint)
        self.peer, self.works, self.keep = peer, works, keep


class _Recv(Handle):
    def __init__(self, endpoint, peer: int, tag: int):
        super().__init__(endpoint)
        self.peer, self.tag = peer, tag


class _Inbound:
    def __init__(self, device: torch.device):
        self.header = torch.empty(wire.HEADER_WORDS, dtype=torch.int64, device=device)
        self.header_work = None
        self.parts: list[Tensor] | None = None
        self.part_works: list = []
        self.tag = 0
        self.seq = 0
        self.stash: dict[int, deque[list[Tensor]]] = {}
        self.waiting: dict[int, deque[_Recv]] = {}


def _completed(work, what: str) -> bool:
    if not work.is_completed():
        return False
    try:
        work.wait()  # surfaces the error of a failed operation
    except RuntimeError as e:
        raise PeerError(f"torch_dist: {what} failed: {str(e).splitlines()[0]}") from None
    return True


class TorchDistEndpoint(Endpoint):
    transport = "torch_dist"

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

    def isend(self, peer: int, tensors: Sequence[Tensor], tag: int = 0) -> Handle:
        self._check_peer(peer)
        keep = [t.contiguous() for t in tensors]
        words = wire.encode_header(self._out_seq[peer], tag, [wire.PartSpec(t.dtype, tuple(t.shape)) for t in keep])
        self._out_seq[peer] += 1
        header = torch.from_numpy(words).to(self.device)
        keep.insert(0, header)
        works = [dist.isend(t, peer) for t in keep if t.numel()]
        h = _Send(self, peer, works, keep)
        self._sends.append(h)
        return h

    def irecv(self, peer: int, tag: int = 0) -> Handle:
        self._check_peer(peer)
        h = _Recv(self, peer, tag)
        st = self._in[peer]
        stash = st.stash.get(tag)
        if stash:
            h.result, h.done = stash.popleft(), True
        else:
            st.waiting.setdefault(tag, deque()).append(h)
            self._pull(peer, st)
        return h

    def _pull(self, peer: int, st: _Inbound) -> bool:
        moved = False
        while True:
            if st.parts is None:
                if st.header_work is None:
                    if not any(st.waiting.values()):
                        return moved
                    st.header_work = dist.irecv(st.header, peer)
                if not _completed(st.header_work, f"receiving a header from rank {peer}"):
                    return moved
                moved = True
                st.header_work = None
                st.tag, specs = wire.decode_header(st.header.cpu().numpy(), st.seq, f"rank {peer} (torch_dist)")
                st.seq += 1
                st.parts = [torch.empty(s.shape, dtype=s.dtype, device=self.device) for s in specs]
                st.part_works = [dist.irecv(t, peer) for t in st.parts if t.numel()]
            if not all(_completed(w, f"receiving a message from rank {peer}") for w in st.part_works):
                return moved
            moved = True
            parts, st.parts, st.part_works = st.parts, None, []
            waiting = st.waiting.get(st.tag)
            if waiting:
                h = waiting.popleft()
                h.result, h.done = parts, True
            else:
                st.stash.setdefault(st.tag, deque()).append(parts)

    def progress(self) -> bool:
        moved = False
        still = []
        for h in self._sends:
            if all(_completed(w, f"sending to rank {h.peer}") for w in h.works):
                h.done, h.keep, moved = True, None, True
            else:
                still.append(h)
        self._sends = still
        for peer, st in self._in.items():
            if st.header_work is not None or st.parts is not None or any(st.waiting.values()):
                moved |= self._pull(peer, st)
        return moved


def connect_torch_dist(rank: int, peers: list[int], *, device="cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> TorchDistEndpoint:
    """An endpoint over the default process group (already initialised by the role worker)."""
    return TorchDistEndpoint(rank, sorted(peers), device, timeout_s)
