"""CUDA IPC transport: processes on one host (on different GPUs, or sharing one) exchange GPU tensors.

Data path. Each process allocates on its current CUDA device one receive ring per sender (uint8,
`capacity` bytes, once) and publishes a CUDA IPC handle for it in the rendezvous store; each sender
maps, once, the ring each peer made for it. The sender copies a message's payload device to device,
on the stream that was current at `isend` (so after the kernels that made the tensors), into the peer's
ring at its write position (through peer access between
GPUs, or within one GPU); messages larger than the free space stream through the ring in chunks.

Control path: an inner shm endpoint (shm.py, prefix `<prefix>/ctl`) carries small int64 CPU messages:
  sender -> receiver, tag _T_DATA:   [ring position, nbytes] (+ the wire.py header on a message's
                                      first chunk: seq, tag, dtypes, shapes, checksum)
  receiver -> sender, tag _T_CREDIT: [bytes of the ring freed so far]
The receiver allocates the parts on its device, copies each chunk out of its ring on its current
stream and, once that copy has completed, delivers the message and (per quarter ring) returns credit.

Sharing a ring (checked in torch's sources: torch/csrc/StorageSharing.cpp, CudaIPCTypes.cpp,
torch/multiprocessing/reductions.py): `UntypedStorage._share_cuda_()` gives (device, handle, storage
bytes, storage offset inside the cudaMalloc block, ref-counter file and offset, event handle, event
flag); the handle names the whole caching-allocator block and `rebuild_cuda_tensor` ->
`UntypedStorage._new_shared_cuda` maps it (cudaIpcOpenMemHandle, lazy peer access, cached per handle)
and applies the offset. Sharing puts the exporter's block behind a reference count: freed while a
peer still maps it, it waits in torch's "limbo" rather than being reused (an exporter that exits first
logs "Producer process has been terminated before all shared CUDA tensors released": harmless here).

Verified where it was run: written without a GPU, where the import, the no-CUDA error and the protocol
(positions, wrap-around, streaming, credit, tags, 8 parts, dead peer) ran with CPU stand-ins for the
CUDA calls; then on one NVIDIA H200 (torch 2.11.0+cu130, several processes sharing the GPU):
tests/comm/test_cuda_ipc.py -m gpu (exchange on one GPU with and without borrow, borrow and release,
dead peer, corrupted header) and benchmarks/cuda_ipc_smoke.py passed. Not yet run: the exchange across two
GPUs (peer access).
"""
from __future__ import annotations

import base64
import json
import os
import re
from collections import deque
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from msc.backends.comm import wire
from msc.backends.comm.m2n import DEFAULT_TIMEOUT_S, Endpoint, Handle, PeerError, TagMatch, _Recv, fetch_key
from msc.errors import MscError

DEFAULT_CAPACITY = 4 << 20
_CTL_CAPACITY = 256 << 10  # shm ring per peer for control messages (~1 KB each); a full ring only queues
_T_DATA, _T_CREDIT = 1, 2


class _Send(Handle):
    def __init__(self, endpoint, peer: int, header: np.ndarray, parts: list[Tensor], keep: list[Tensor]):
        super().__init__(endpoint)
        self.peer, self.header, self.parts, self.keep = peer, header, parts, keep
        self.total, self.sent, self.cursor, self.first = sum(p.numel() for p in parts), 0, [0, 0], True
        self.inner: Handle | None = None  # the inner (shm) send of its last control message
        self.stream = None  # the stream current at isend: its copies into the ring run there


class _Out:
    """Send state towards one peer: its ring as mapped here, positions, queued and in-flight chunks."""

    def __init__(self, ring: Tensor, credit_h: Handle):
        self.ring, self.cap, self.credit_h = ring, ring.numel(), credit_h
        self.write = self.credit = self.seq = 0  # bytes ever written to its ring / freed by it; messages sent
        self.queue: deque[_Send] = deque()  # messages not fully copied yet (the head may be partly copied)
        self.inflight: deque = deque()  # (event | None, control words, finished _Send | None), in copy order


class _In:
    """Receive state from one peer: our ring for it, the message being assembled, copies in flight."""

    def __init__(self, ring: Tensor, ctrl_h: Handle):
        self.ring, self.cap, self.ctrl_h = ring, ring.numel(), ctrl_h
        self.read = self.freed = self.reported = self.seq = 0  # ring position; bytes copied out / credited
        self.cur = None  # the message being assembled: [tag, parts, byte views, cursor, bytes left]
        # Ring regions in ring order, each [copy event | None, nbytes, (tag, parts) | None, hold | None]:
        # copied-out messages wait for their copy's event to be delivered; a borrowed (lent) message was
        # delivered at once and its hold, [lent, release event | None], frees it. Space is credited back
        # in ring order, as the oldest regions become free.
        self.pending: deque = deque()
        self.match = TagMatch()


class _IpcRecv(_Recv):
    def release(self) -> None:
        """Give a borrowed message's ring space back (after the work queued on the current stream)."""
        if self.holds:
            self.endpoint._release(self.holds)
            self.holds = []


def _bytes(t: Tensor) -> Tensor:
    return t.reshape(-1).view(torch.uint8)  # a flat byte view of a contiguous tensor (any dtype)


def _ring_copy(ring: Tensor, pos: int, n: int, parts: list[Tensor], cursor: list[int], into_ring: bool) -> None:
    """Copy `n` bytes between `ring` from position `pos` (wrapping) and `parts` from `cursor` [part, offset]."""
    cap = ring.numel()
    while n:
        part, at = parts[cursor[0]], pos % cap
        k = min(n, part.numel() - cursor[1], cap - at)  # stop at the part's end and at the ring's end
        r, p = ring[at : at + k], part[cursor[1] : cursor[1] + k]
        r.copy_(p, non_blocking=True) if into_ring else p.copy_(r, non_blocking=True)
        pos, n, cursor[1] = pos + k, n - k, cursor[1] + k
        if cursor[1] == part.numel():
            cursor[0], cursor[1] = cursor[0] + 1, 0


class CudaIpcEndpoint(Endpoint):
    transport = "cuda_ipc"

    def __init__(self, rank: int, peers: Sequence[int], inner, rings: dict[int, Tensor], peer_rings: dict[int, Tensor],
                 device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S, borrow: bool = False):
        super().__init__(rank, sorted(peers), timeout_s)
        self.inner, self.device, self.borrow = inner, device, borrow
        self._in = {p: _In(rings[p], inner.irecv(p, _T_DATA)) for p in self.peers}
        self._out = {p: _Out(peer_rings[p], inner.irecv(p, _T_CREDIT)) for p in self.peers}
        self._leaving: list[_Send] = []  # copied; done once their last control message is handed to shm
        self._events: list = []  # completed events, for reuse
        self._closed = False

    def _state(self, table: dict, peer: int):
        if self._closed:
            raise MscError(f"cuda_ipc: rank {self.rank} used its endpoint after close()")
        if peer not in table:
            raise MscError(f"rank {self.rank} has no connection to rank {peer}; peers: {self.peers}")
        return table[peer]

    def _complete(self, ev) -> bool:
        """True once the copy behind `ev` has finished (None: there was no copy); recycles the event."""
        done = ev is None or ev.query()
        if done and ev is not None:
            self._events.append(ev)
        return done

    def _record(self, stream):
        ev = self._events.pop() if self._events else torch.cuda.Event()
        ev.record(stream)
        return ev

    def debug_state(self) -> str:
        """Ring positions and queue lengths per peer, on one line (appended to wait errors)."""
        return "; ".join(f"rank {p}: out write={o.write} credit={o.credit} queued={len(o.queue)} copying={len(o.inflight)}"
                         f", in read={st.read} freed={st.freed} credited={st.reported} copying={len(st.pending)} "
                         f"partial={st.cur is not None}" for p, o, st in ((p, self._out[p], self._in[p]) for p in self.peers))

    def _wait(self, ready, handles, timeout) -> None:
        try:
            super()._wait(ready, handles, timeout)
        except PeerError as e:
            raise PeerError(f"{e} [{self.debug_state()}]") from None

    # ------------------------------------------------------------------ send
    def isend(self, peer: int, tensors: Sequence[Tensor], tag: int = 0, *, flush: bool = True) -> Handle:
        o = self._state(self._out, peer)
        keep = []
        for t in tensors:
            if not isinstance(t, Tensor) or t.device.type != "cuda":
                raise MscError(f"cuda_ipc carries CUDA tensors; got one on {getattr(t, 'device', type(t).__name__)} "
                               f"(move it to {self.device}, or use shm)")
            if t.device != self.device:
                raise MscError(f"cuda_ipc: rank {self.rank}'s endpoint is on {self.device}, got a tensor on {t.device}")
            t = t.detach()
            keep.append(t if t.is_contiguous() else t.contiguous())
        header = wire.encode_header(o.seq, tag, [wire.PartSpec(t.dtype, tuple(t.shape)) for t in keep])
        o.seq += 1
        h = _Send(self, peer, header, [_bytes(t) for t in keep if t.numel()], keep)
        # NOTE: the copies into the ring go on the caller's current stream, ordered after the kernels that
        # made the tensors, and `keep` holds the tensors until their copy has completed. (A copy stream of
        # our own cost ~0.1 ms of host time per message in stream switches and cross-stream waits, measured
        # on the H200 with benchmarks/cuda_ipc_phases.py, far more than the overlap it could buy.)
        h.stream = torch.cuda.current_stream(self.device) if h.total else None
        o.queue.append(h)
        if len(o.queue) == 1:
            self._issue(peer, o, on_current=True)
        if flush:
            self.flush()
        return h

    def flush(self) -> None:
        self.inner.flush()  # control messages already handed to shm: ring the peers' doorbells

    def _issue(self, peer: int, o: _Out, on_current: bool = False) -> bool:
        """Copy queued payload into the peer's ring as far as its free space allows (on_current: the head
        message's stream is the current one, no switch needed)."""
        moved = False
        while o.queue:
            h = o.queue[0]
            left, free = h.total - h.sent, o.cap - (o.write - o.credit)
            # NOTE: wait for a useful amount of space rather than dribble bytes; cannot deadlock, since a
            # receiver that has copied everything out holds back less than a quarter ring of credit.
            if left and free < min(left, o.cap // 4):
                break
            if h.first and left and not self.inner.channels[peer].alive():
                break  # never write into the memory of a dead peer; the wait reports it (stalled_peer)
            n, ev = min(left, free), None
            if n:
                if on_current and h.first:
                    _ring_copy(o.ring, o.write, n, h.parts, h.cursor, into_ring=True)
                else:  # a later chunk, copied from progress(): on the stream of its isend
                    with torch.cuda.stream(h.stream):
                        _ring_copy(o.ring, o.write, n, h.parts, h.cursor, into_ring=True)
                ev = self._record(h.stream)
            ctrl = np.array([o.write, n], dtype=np.int64)
            if h.first:
                ctrl, h.first = np.concatenate([ctrl, h.header.view(np.int64)]), False
            o.write, h.sent, moved = o.write + n, h.sent + n, True
            finished = h.sent == h.total
            o.inflight.append((ev, ctrl, h if finished else None))
            if finished:
                o.queue.popleft()
        return moved

    def _finish_sends(self, peer: int, o: _Out) -> bool:
        # NOTE: completion is made visible by the sender: a chunk's control message leaves only after the
        # host has seen the copy's event complete, so when the receiver reads the message the bytes are in
        # its ring. (An interprocess event per chunk would save that host round trip but needs a pool of
        # shared events, a handle exchange for each, and care not to re-record one the receiver has not
        # waited on yet; a polled local event is simpler and plainly correct.)
        moved = False
        while o.inflight and self._complete(o.inflight[0][0]):
            _, ctrl, h = o.inflight.popleft()
            ih = self.inner.isend(peer, [torch.from_numpy(ctrl)], _T_DATA, flush=False)
            if h is not None:
                h.keep, h.parts, h.inner = None, None, ih
                self._leaving.append(h)
            moved = True
        return moved

    # ------------------------------------------------------------------ receive
    def irecv(self, peer: int, tag: int = 0) -> Handle:
        st = self._state(self._in, peer)
        h = _IpcRecv(self, peer, tag)
        st.match.claim(h)
        return h

    def _on_control(self, peer: int, st: _In, w: np.ndarray, stream) -> None:
        who = f"rank {peer} (cuda_ipc control)"
        if len(w) not in (2, 2 + wire.HEADER_WORDS):
            raise wire.CorruptMessage(f"corrupted header from {who}: control message of {len(w)} words")
        start, n = int(w[0]), int(w[1])
        if len(w) > 2:  # the first chunk of a new message
            if st.cur is not None:
                raise wire.CorruptMessage(f"corrupted stream from {who}: a new message began inside message #{st.seq - 1}")
            tag, specs, total = wire.decode_header_sized(w[2:], st.seq, who)
            if start != st.read:
                raise wire.CorruptMessage(f"corrupted stream from {who}: chunk at ring position {start}, expected {st.read}")
            st.seq += 1
            lent = self._lend(st, start, n, total, specs) if self.borrow else None
            if lent is not None:  # all of it in one piece of our ring: deliver views of the ring, no copy
                hold = [True, None]
                st.read += n
                st.pending.append([None, n, None, hold])
                st.match.deliver(tag, lent, [hold])
                return
            parts = [torch.empty(s.shape, dtype=s.dtype, device=self.device) for s in specs]
            st.cur = [tag, parts, [_bytes(p) for p in parts if p.numel()], [0, 0], sum(s.nbytes for s in specs)]
        cur = st.cur
        if cur is None or start != st.read or not 0 <= n <= cur[4]:
            raise wire.CorruptMessage(f"corrupted stream from {who}: chunk of {n} bytes at ring position {start}, "
                                      f"expected position {st.read} and at most {cur[4] if cur else 0} bytes")
        ev = None
        if n:
            # NOTE: copies out on the caller's current stream, where the parts were allocated and where
            # the caller will use them; the message is delivered (and its ring space credited) only once
            # this copy has completed, so the parts are ready on any stream when the handle is done.
            _ring_copy(st.ring, start, n, cur[2], cur[3], into_ring=False)
            ev = self._record(stream)
        st.read, cur[4] = st.read + n, cur[4] - n
        if cur[4] == 0:
            st.cur = None
        st.pending.append([ev, n, (cur[0], cur[1]) if cur[4] == 0 else None, None])

    @staticmethod
    def _lend(st: _In, start: int, n: int, total: int, specs: list) -> list[Tensor] | None:
        """The message's parts as views of our ring when it came whole, in one piece, aligned; else None."""
        at = start % st.cap
        # NOTE: a lent region holds back the credit of everything behind it until its release, so a message
        # is lent only while the uncredited part of the ring stays within half of it; otherwise it is copied
        # out (freed as soon as the copy completes). A holder that waits for more than half a ring of further
        # data from the same peer before releasing would stall that peer (reported after the timeout).
        if n != total or at + n > st.cap or st.read + n - st.freed > st.cap // 2:
            return None
        out, off = [], at
        for spec in specs:
            if spec.nbytes == 0:
                out.append(torch.empty(spec.shape, dtype=spec.dtype, device=st.ring.device))
                continue
            if off % spec.dtype.itemsize:
                return None  # misaligned for its dtype (after an odd-sized part): copy this message
            out.append(st.ring[off : off + spec.nbytes].view(spec.dtype).view(spec.shape))
            off += spec.nbytes
        return out

    def _release(self, holds: list) -> None:
        """A borrowed message's holder is done with it: once the work queued so far on the current stream
        (which may still read the views) has run, its ring space can be credited back."""
        stream = torch.cuda.current_stream(self.device)
        for hold in holds:
            hold[0], hold[1] = False, self._record(stream)

    def _finish_recvs(self, peer: int, st: _In) -> bool:
        moved = False
        # NOTE: copied-out messages are delivered once every copy before theirs has completed, even behind a
        # lent region (its holder may be waiting for them); ring space is credited strictly in ring order.
        for e in st.pending:
            if e[0] is not None:
                if not self._complete(e[0]):
                    break
                e[0] = None
            if e[2] is not None:
                st.match.deliver(*e[2])
                e[2], moved = None, True
        while st.pending:
            e = st.pending[0]
            if e[0] is not None or e[2] is not None:
                break
            hold = e[3]
            if hold is not None:
                if hold[0] or (hold[1] is not None and not self._complete(hold[1])):
                    break
                hold[1] = None
            st.pending.popleft()
            st.freed, moved = st.freed + e[1], True
        if st.freed - st.reported >= st.cap // 4:  # NOTE: credit in quarter rings: fewer control messages
            self.inner.isend(peer, [torch.tensor([st.freed], dtype=torch.int64)], _T_CREDIT, flush=False)
            st.reported = st.freed
        return moved

    # ------------------------------------------------------------------ progress
    def progress(self) -> bool:
        if self._closed:
            return False
        moved = self.inner.progress()
        stream = None  # the current stream, asked for once a pass and only when a message came
        for peer in self.peers:
            st, o = self._in[peer], self._out[peer]
            while st.ctrl_h.done:
                (msg,) = st.ctrl_h.result
                st.ctrl_h = self.inner.irecv(peer, _T_DATA)
                if stream is None:
                    stream = torch.cuda.current_stream(self.device)
                self._on_control(peer, st, msg.numpy(), stream)
                moved = True
            if st.pending:
                moved |= self._finish_recvs(peer, st)
            while o.credit_h.done:
                freed = int(o.credit_h.result[0][0])
                o.credit_h = self.inner.irecv(peer, _T_CREDIT)
                if not o.credit <= freed <= o.write:
                    raise wire.CorruptMessage(f"corrupted credit from rank {peer}: {freed} bytes freed, {o.write} written")
                o.credit, moved = freed, True
            if o.inflight:
                moved |= self._finish_sends(peer, o)
            if o.queue:
                moved |= self._issue(peer, o)
        self.inner.flush()  # one doorbell per peer for all the control messages of this pass
        for h in [h for h in self._leaving if h.inner.done]:
            h.done = moved = True
        self._leaving = [h for h in self._leaving if not h.done]
        return moved

    def idle(self, idle_s: float, budget_s: float) -> None:
        # NOTE: nobody rings our doorbell when our own GPU copies finish: while some are in flight, keep
        # polling (yielding the core); otherwise sleep on the shm doorbell, which peers ring when they send
        # control messages or return credit.
        if any(o.inflight for o in self._out.values()) or any(self._gpu_pending(st) for st in self._in.values()):
            os.sched_yield()
            return
        self.inner.idle(idle_s, budget_s)

    @staticmethod
    def _gpu_pending(st: _In) -> bool:
        """Whether some region of `st` waits for GPU work (a copy out, or the work before a release)."""
        return any(e[0] is not None or (e[3] is not None and not e[3][0] and e[3][1] is not None) for e in st.pending)

    def stalled_peer(self, handles: Sequence[Handle]) -> str | None:
        # A receive whose bytes are already being copied out of our ring does not depend on the peer.
        live = [h for h in handles if not h.done and not (isinstance(h, _Recv) and
                                                          any(e[2] is not None for e in self._in[h.peer].pending))]
        return self.inner.stalled_peer(live)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            torch.cuda.synchronize(self.device)  # no copy into a peer's ring or out of ours is left running
        finally:
            for o in self._out.values():
                o.ring, o.queue, o.inflight = None, deque(), deque()
            self.inner.close()
            for st in self._in.values():
                st.ring = None  # if a peer still maps it, torch parks the block until the peer lets go


def _alloc_ring(nbytes: int, device: torch.device) -> Tensor:
    """A uint8 ring from the caching allocator, outside expandable segments (see the NOTE)."""
    getter = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    conf = getter() if getter else os.environ.get("PYTORCH_CUDA_ALLOC_CONF", os.environ.get("PYTORCH_ALLOC_CONF", ""))
    on = r"expandable_segments\s*:\s*true"
    if not (setter and re.search(on, conf or "", re.I)):
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    # NOTE: blocks of expandable segments are shared through file descriptors (pidfd_getfd), which
    # containers often forbid; with the option off for this one allocation the allocator takes a plain
    # cudaMalloc block (it skips expandable blocks while the option is off). The whole setting string is
    # restored after, since some torch versions reset the options a string does not name.
    setter(re.sub(on, "expandable_segments:False", conf, flags=re.I))
    try:
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    finally:
        setter(conf)


def _export(ring: Tensor) -> str:
    """JSON text (bytes as base64, no pickle) that lets one other process map `ring`."""
    dev, handle, size, offset, ref, ref_off, event, event_sync = ring.untyped_storage()._share_cuda_()
    text = {k: base64.b64encode(v).decode() for k, v in (("handle", handle), ("ref", ref), ("event", event))}
    return json.dumps({"pid": os.getpid(), "device": dev, "size": size, "offset": offset, "ref_offset": ref_off,
                       "event_sync": bool(event_sync), **text})


def _import(text: str, device: torch.device, capacity: int, rank: int, peer: int) -> Tensor:
    """Map a peer's ring (exported by `_export`) into this process, on our own device."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    d = json.loads(text)
    if d["size"] != capacity:
        raise MscError(f"cuda_ipc: rank {peer}'s ring is {d['size']} bytes, rank {rank} expects {capacity} "
                       "(every rank must use the same runtime.buffer_bytes)")
    raw = {k: base64.b64decode(d[k]) for k in ("handle", "ref", "event")}
    try:
        # NOTE: the handle is opened on *our* device index: indices are per process (CUDA_VISIBLE_DEVICES),
        # and what writes the ring is a copy on one of our streams, on our device (through peer access when the ring
        # lives on another GPU). The storage's offset inside the peer's cudaMalloc block is applied inside.
        return rebuild_cuda_tensor(torch.Tensor, (capacity,), (1,), 0, torch.UntypedStorage, torch.uint8, device.index,
                                   raw["handle"], d["size"], d["offset"], False, raw["ref"], d["ref_offset"],
                                   raw["event"], d["event_sync"])
    except RuntimeError as e:
        raise MscError(f"cuda_ipc: rank {rank} (pid {os.getpid()}, {device}) cannot map the ring of rank {peer} "
                       f"(pid {d['pid']}, its cuda:{d['device']}): {str(e).splitlines()[0]}; the processes must share "
                       "one host and IPC namespace, and their GPUs must allow peer access") from None


def connect_cuda_ipc(rank: int, peers: list[int], store, *, prefix: str = "m2n", timeout_s: float = DEFAULT_TIMEOUT_S,
                     capacity: int = DEFAULT_CAPACITY, borrow: bool = False) -> CudaIpcEndpoint:
    """Allocate a GPU ring per peer on the current device, publish them, map the peers'; return the endpoint.

    borrow: a message that arrives whole and in one piece is delivered as views of the ring (no copy, no
    allocation), valid until its handle's `release()`; the others are copied out as before."""
    if not torch.cuda.is_available():
        raise MscError(f"transport cuda_ipc needs a CUDA GPU, but torch.cuda.is_available() is False here (torch "
                       f"{torch.__version__}, CUDA build {torch.version.cuda}); use shm for CPU tensors")
    if store is None:
        raise MscError("transport cuda_ipc needs a rendezvous store")
    if capacity < 4096:
        raise MscError(f"cuda_ipc ring capacity must be at least 4096 bytes, got {capacity}")
    from msc.backends.comm.shm import connect_shm

    peers = sorted(peers)
    device = torch.device("cuda", torch.cuda.current_device())
    rings = {p: _alloc_ring(capacity, device) for p in peers}
    torch.cuda.synchronize(device)
    for p, ring in rings.items():
        store.set(f"{prefix}/cuda_ipc/ring/{rank}/{p}", _export(ring))
    # connect_shm returns once every peer has published its mailbox, i.e. after its rings (set above).
    inner = connect_shm(rank, peers, store, prefix=prefix + "/ctl", timeout_s=timeout_s, capacity=_CTL_CAPACITY)
    try:
        mapped = {}
        for p in peers:
            key = f"{prefix}/cuda_ipc/ring/{p}/{rank}"
            mapped[p] = _import(fetch_key(store, key, timeout_s, f"cuda_ipc: rank {p} did not publish its ring"),
                                device, capacity, rank, p)
        return CudaIpcEndpoint(rank, peers, inner, rings, mapped, device, timeout_s, borrow)
    except BaseException:
        inner.close()
        raise
