"""msc's M2N library: one interface for the M-to-N (dispatch) and N-to-M (combine) token exchange.

An `Endpoint` is one process's end of a set of persistent connections, one per peer, made once at
start-up. Messages are a tag plus a list of tensors of any shape; they go out with `isend` and come in
with `irecv`, both non-blocking and both returning a handle whose `wait(timeout)` finishes them.

    ep = connect("shm", rank, peers, store, timeout_s=30)
    h = ep.isend(peer, [hidden, idx, weights], tag=layer)     # returns at once
    r = ep.irecv(peer, tag=layer)
    hidden, idx, weights = r.wait()                            # MscError naming the peer on timeout
    ep.wait_all([h]); ep.close()

Byte-stream transports (shared memory, TCP) implement a `Channel` per peer (non-blocking
`write_some` / `read_some` / `alive`); `StreamEndpoint` turns those into messages. Every message starts
with the header from `wire.py` (size, sequence number, tag, shapes), so the receiver needs no size
exchange and detects completion from the stream itself; nothing waits for an acknowledgement.

NOTE: progress is cooperative: any `wait`, `test` or `progress` call on an endpoint moves every pending
send and receive of that endpoint forward. A send that fits in the channel's free space completes inside
`isend`, so the common case needs no progress call at all; a large message streams through the channel
as the receiver drains it. Cooperative progress keeps the library single-threaded (no locks, no GIL
hand-offs on the hot path) and cannot deadlock two endpoints that send large messages to each other,
because each side's wait also drains what the other side is sending.
"""
from __future__ import annotations

import time
from datetime import timedelta
from collections import deque
from typing import Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from msc.backends.comm import wire
from msc.errors import MscError

DEFAULT_TIMEOUT_S = 60.0
TRANSPORTS = ("shm", "tcp", "cuda_ipc", "rdma", "torch_dist")


class PeerError(MscError):
    """A peer died, closed its end or stayed silent past the timeout."""


class Channel(Protocol):
    """A reliable, ordered, non-blocking byte stream to one peer (both directions)."""

    name: str

    def write_some(self, data: np.ndarray) -> int: ...  # uint8 bytes taken (0 when full); never blocks
    def read_some(self, into: np.ndarray) -> int: ...  # uint8 bytes read (0 when nothing arrived); never blocks
    def alive(self) -> bool: ...  # False once the peer is dead or closed and nothing more can be read
    def flush(self) -> None: ...  # after a burst of writes: signal the peer (doorbell), if the transport has one
    def close(self) -> None: ...


_NP_DTYPE = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64, torch.int64: np.int64,
             torch.int32: np.int32, torch.int16: np.int16, torch.int8: np.int8, torch.uint8: np.uint8, torch.bool: np.bool_,
             torch.bfloat16: np.int16}  # bfloat16 travels as int16 through numpy, then is viewed back


def _views(buf: np.ndarray, specs: list, offset: int | None = None) -> list[Tensor]:
    """Tensors of the given specs laid out back to back in `buf` (uint8), without copying.

    offset: where buf starts relative to an address aligned for every dtype (a ring's start), when known;
    it saves asking numpy for each part's address (a microsecond each)."""
    out, at = [], 0
    for s in specs:
        n = s.nbytes
        if n == 0:
            out.append(torch.empty(s.shape, dtype=s.dtype))
            continue
        raw = buf[at : at + n]
        np_dtype = _NP_DTYPE.get(s.dtype)
        addr = offset + at if offset is not None else raw.ctypes.data
        if np_dtype is not None and addr % s.dtype.itemsize == 0:
            t = torch.from_numpy(raw.view(np_dtype).reshape(s.shape))
            out.append(t.view(torch.bfloat16) if s.dtype == torch.bfloat16 else t)
        else:  # misaligned for its dtype (after an odd-sized part): this part is copied
            t = torch.empty(s.shape, dtype=s.dtype)
            _as_bytes(t)[:] = raw
            out.append(t)
        at += n
    return out


def _as_bytes(t: Tensor) -> np.ndarray:
    """A flat uint8 view of a contiguous CPU tensor (any dtype, including bfloat16)."""
    # NOTE: numpy views cost a fraction of torch's per-op overhead, which dominates small messages.
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().reshape(-1).view(np.uint8)


class Handle:
    """A pending operation; `wait` finishes it (with a timeout) and returns its result."""

    def __init__(self, endpoint: "Endpoint"):
        self.endpoint = endpoint
        self.done = False
        self.result = None

    def test(self) -> bool:
        """Move things forward once; True when this operation has completed."""
        if not self.done:
            self.endpoint.progress()
        return self.done

    def wait(self, timeout: float | None = None):
        self.endpoint.wait_all([self], timeout)
        return self.result

    def release(self) -> None:
        """Give a received message's buffer space back (see `borrow`); a no-op for copied messages."""


class Endpoint:
    """Base class of all transports: bookkeeping of tags, timeouts and waiting."""

    transport = "?"
    blocking_progress = False  # True: progress() may block until a wanted peer sends (torch_dist)

    def __init__(self, rank: int, peers: Sequence[int], timeout_s: float = DEFAULT_TIMEOUT_S):
        self.rank = rank
        self.peers = list(peers)
        self.timeout_s = timeout_s

    # ---- subclasses provide
    def isend(self, peer: int, tensors: Sequence[Tensor], tag: int = 0, *, flush: bool = True) -> Handle:
        """Start sending `tensors` to `peer` under `tag`. With flush=False the peer is not signalled
        yet (its doorbell rings at the next `flush`, `progress` or wait): a burst of sends then costs
        one wake-up per peer instead of one per message."""
        raise NotImplementedError

    def flush(self) -> None:
        """Signal every peer that has unsignalled data from us."""

    def irecv(self, peer: int, tag: int = 0) -> Handle:
        raise NotImplementedError

    def progress(self) -> bool:
        """Advance pending operations once; True if anything moved."""
        raise NotImplementedError

    def stalled_peer(self, handles: Sequence[Handle]) -> str | None:
        """Name of a dead peer that one of `handles` depends on, else None."""
        return None

    def close(self) -> None:
        pass

    # ---- shared behaviour
    def send(self, peer: int, tensors: Sequence[Tensor], tag: int = 0, timeout: float | None = None) -> None:
        self.isend(peer, tensors, tag).wait(timeout)

    def recv(self, peer: int, tag: int = 0, timeout: float | None = None) -> list[Tensor]:
        return self.irecv(peer, tag).wait(timeout)

    def wait_all(self, handles: Sequence[Handle], timeout: float | None = None) -> list:
        pending = [h for h in handles if not h.done]
        if pending:
            self._wait(lambda: all(h.done for h in pending), pending, timeout)
        return [h.result for h in handles]

    def wait_any(self, handles: Sequence[Handle], timeout: float | None = None) -> int:
        """Index of the first of `handles` to complete (arrival order, not list order)."""
        if not handles:
            raise ValueError("wait_any needs at least one handle")
        found: list[int] = []

        def ready() -> bool:
            for i, h in enumerate(handles):
                if h.done:
                    found.append(i)
                    return True
            return False

        if not ready():
            self._wait(ready, list(handles), timeout)
        return found[0]

    def wait_any_group(self, groups: Sequence[Sequence[Handle]], timeout: float | None = None) -> int:
        """Index of the first of `groups` whose handles have all completed (the lowest index when several
        have). The ping-pong expert uses it to start on whichever micro-batch has arrived from every
        attention replica. An empty group counts as complete."""
        if not groups:
            raise ValueError("wait_any_group needs at least one group")
        found: list[int] = []

        def ready() -> bool:
            for i, g in enumerate(groups):
                if all(h.done for h in g):
                    found.append(i)
                    return True
            return False

        if not ready():
            self._wait(ready, [h for g in groups for h in g], timeout)
        return found[0]

    def idle(self, idle_s: float, budget_s: float) -> None:
        """Called when nothing moved for `idle_s`; may block up to `budget_s` for the peers to act.

        NOTE: the default spins for 50 us, then yields, then sleeps in 50 us steps, so that a waiting
        process does not steal the core its peers need (roles often outnumber cores on one host).
        Transports with a wake-up signal (the shm doorbell) override this and block in the kernel.
        """
        if idle_s > 50e-6:
            time.sleep(0 if idle_s < 2e-3 else min(50e-6, budget_s))

    def _wait(self, ready, handles: Sequence[Handle], timeout: float | None) -> None:
        timeout = self.timeout_s if timeout is None else timeout
        start = time.monotonic()
        last_move = start
        next_check = start + 0.05
        while True:
            moved = self.progress()
            if ready():
                return
            now = time.monotonic()
            if moved:
                last_move = now
            if now >= next_check:
                next_check = now + 0.05
                dead = self.stalled_peer(handles)
                if dead is not None:
                    raise PeerError(f"{self.transport}: peer {dead} died or closed its end while rank {self.rank} waited on it")
                if now - start > timeout:
                    peers = sorted({getattr(h, "peer", "?") for h in handles if not h.done})
                    raise PeerError(
                        f"{self.transport}: rank {self.rank} waited {timeout:.1f} s on peer(s) {peers} without a message; "
                        "the peer is dead or silent"
                    )
            self.idle(now - last_move, max(0.0, next_check - now))


class _Send(Handle):
    def __init__(self, endpoint, peer: int, chunks: list[np.ndarray] | None, keep: list[Tensor] | None, done: bool = False):
        # NOTE: no super().__init__ here and in _Recv: one of these is made for every message (hot path)
        self.endpoint, self.done, self.result = endpoint, done, None
        self.peer, self.chunks, self.keep, self.offset = peer, chunks, keep, 0


class _Recv(Handle):
    def __init__(self, endpoint, peer: int, tag: int):
        self.endpoint, self.done, self.result = endpoint, False, None
        self.peer, self.tag = peer, tag
        self.holds: list = []

    def release(self) -> None:
        if self.holds:
            ch = self.endpoint.channels[self.peer]
            for hold in self.holds:
                ch.release(hold)
            self.holds = []


class TagMatch:
    """Matches one peer's messages to receives by tag: a message nobody has asked for yet waits in
    the stash, a receive posted before its message waits in `waiting` (both first in, first out)."""

    def __init__(self):
        self.stash: dict[int, deque[tuple[list[Tensor], list]]] = {}
        self.waiting: dict[int, deque[_Recv]] = {}
        self.pending = 0  # receives in `waiting` (progress asks on every pass: a count, not a scan)

    def claim(self, h: "_Recv") -> None:
        """Complete `h` from the stash if its message came already, else queue it."""
        stash = self.stash.get(h.tag)
        if stash:
            (h.result, h.holds), h.done = stash.popleft(), True
        else:
            self.waiting.setdefault(h.tag, deque()).append(h)
            self.pending += 1

    def deliver(self, tag: int, parts: list[Tensor], holds: list | None = None) -> None:
        waiting = self.waiting.get(tag)
        if waiting:
            h = waiting.popleft()
            self.pending -= 1
            h.result, h.holds, h.done = parts, holds or [], True
        else:  # arrived before anyone asked for it: keep it for a later irecv with this tag
            self.stash.setdefault(tag, deque()).append((parts, holds or []))

    def wanted(self) -> bool:
        """True while some receive waits for a message."""
        return self.pending > 0

    def abandon(self) -> None:
        """Forget the waiting receives (the stream they waited on is broken)."""
        self.waiting = {}
        self.pending = 0


class _Inbound:
    """Receive state of one peer's stream: the message being read and the messages read but not claimed."""

    def __init__(self, label: str = "?"):
        self.label = label  # who sends this stream, for error messages
        self.header = np.empty(wire.HEADER_BYTES, dtype=np.uint8)
        self.header_got = 0
        self.specs: list[wire.PartSpec] | None = None  # of the message whose payload comes next
        self.parts: list[Tensor] | None = None
        self.targets: list[np.ndarray] = []
        self.part_i = 0
        self.part_got = 0
        self.tag = 0
        self.seq = 0
        self.match = TagMatch()
        self.broken: Exception | None = None


_WAIT = object()  # Channel.borrow: "the bytes are not all here yet, but will be readable in place"


class StreamEndpoint(Endpoint):
    """Messages over one non-blocking byte `Channel` per peer (shared memory, TCP).

    NOTE: with `borrow=True` (channels that support it: shm), a received message's tensors are views
    of the receive ring itself, not copies: the sender's copy into our ring is the only copy, as with
    RDMA. The ring space stays taken until the handle's `release()`; a receiver that never releases
    eventually stalls its sender (reported as a silent peer, after the timeout). Messages that would
    wrap around the ring's end, or are larger than it, are copied as usual.
    """

    def __init__(self, rank: int, channels: dict[int, Channel], timeout_s: float = DEFAULT_TIMEOUT_S, *,
                 borrow: bool = False):
        super().__init__(rank, sorted(channels), timeout_s)
        self.channels = channels
        self.borrow = borrow and all(hasattr(ch, "borrow") for ch in channels.values())
        self._out: dict[int, deque[_Send]] = {p: deque() for p in channels}
        self._out_seq = {p: 0 for p in channels}
        self._in = {p: _Inbound(f"rank {p} ({ch.name})") for p, ch in channels.items()}
        self._dirty: set[int] = set()  # peers with data written but not yet signalled
        self._closed = False
        # NOTE: channels that can write or lend a whole message at once (shm: put_message / take_message)
        # get a fast path: one header encode and one copy per part on send; on receive the header is
        # decoded in place and the payload lent in place; a single position update each. The general
        # code (byte streaming, partial headers, wrap-around, copies) stays for everything else.
        self._whole = all(hasattr(ch, "put_message") and hasattr(ch, "take_message") for ch in channels.values())

    def _channel(self, peer: int) -> Channel:
        try:
            return self.channels[peer]
        except KeyError:
            raise MscError(f"rank {self.rank} has no connection to rank {peer}; peers: {self.peers}") from None

    # ------------------------------------------------------------------ send
    def isend(self, peer: int, tensors: Sequence[Tensor], tag: int = 0, *, flush: bool = True) -> Handle:
        ch = self.channels.get(peer) or self._channel(peer)
        keep, key = [], []
        for t in tensors:
            if not t.is_cpu or t.requires_grad:
                raise MscError(f"{self.transport} carries CPU tensors without grad; got one on {t.device}"
                               f"{' that requires grad' if t.requires_grad else ''} (use cuda_ipc for GPU tensors)")
            if not t.is_contiguous():
                t = t.contiguous()
            keep.append(t)
            key.append((t.dtype, t.shape))
        header, payload = wire.encode_header_bytes(self._out_seq[peer], tag, tuple(key))
        self._out_seq[peer] += 1
        q = self._out[peer]
        if not q and self._whole and ch.put_message(header, [(t.data_ptr(), t.nbytes) for t in keep if t.nbytes], payload):
            self._dirty.add(peer)
            h = _Send(self, peer, None, None, done=True)
        else:
            chunks = [np.frombuffer(header, dtype=np.uint8)] + [_as_bytes(t) for t in keep if t.numel()]
            h = _Send(self, peer, chunks, keep)
            q.append(h)
            if len(q) == 1:
                self._push(peer, ch, q)
        if flush:
            self.flush()
        return h

    def _push(self, peer: int, ch: Channel, q: deque) -> bool:
        moved = False
        while q:
            h = q[0]
            while h.chunks:
                chunk = h.chunks[0]
                n = ch.write_some(chunk[h.offset :])
                if n == 0:
                    return moved
                moved = True
                self._dirty.add(peer)
                h.offset += n
                if h.offset == chunk.nbytes:
                    h.chunks.pop(0)
                    h.offset = 0
            h.done, h.keep = True, None
            q.popleft()
        return moved

    # ------------------------------------------------------------------ receive
    def irecv(self, peer: int, tag: int = 0) -> Handle:
        ch = self.channels.get(peer) or self._channel(peer)
        h = _Recv(self, peer, tag)
        st = self._in[peer]
        if st.broken is not None:
            raise st.broken
        st.match.claim(h)
        if not h.done:
            self._pull(peer, ch, st)
        return h

    def _pull(self, peer: int, ch: Channel, st: _Inbound) -> bool:
        moved = False
        whole = self._whole and self.borrow
        while True:
            if whole and st.specs is None and not st.header_got:
                head = ch.next_header(wire.HEADER_BYTES)
                if head is not None:
                    pad = self._skip(st, head)
                    if pad is not None:  # a skip record: the sender went on at the ring's start
                        ch.discard(wire.HEADER_BYTES + pad)
                        moved = True
                        continue
                    tag, specs, payload = self._decode(st, head)
                    got = ch.take_message(wire.HEADER_BYTES, payload)
                    if got is not None:  # all of it is here, in one piece: lend it in place
                        view, at, hold = got
                        st.seq += 1
                        st.match.deliver(tag, _views(view, specs, at), [hold])
                        moved = True
                        continue
                # not all here yet, or it wraps around the ring's end: the general path below
            if st.specs is None:  # reading a header
                view = st.header[st.header_got :]
                n = ch.read_some(view)
                if n == 0:
                    return moved
                moved = True
                st.header_got += n
                if st.header_got < wire.HEADER_BYTES:
                    continue
                st.header_got = 0
                pad = self._skip(st, st.header) if self._whole else None
                if pad is not None:  # a skip record read the general way: pass over what it covers
                    ch.discard(pad)
                    continue
                st.tag, specs, _ = self._decode(st, st.header)
                st.seq += 1
                st.specs = specs
                if not self.borrow:
                    self._start_copy(st)
            if st.parts is None:  # borrow: take the payload in place once all of it has arrived
                total = sum(s.nbytes for s in st.specs)
                got = ch.borrow(total) if total else (np.empty(0, dtype=np.uint8), None)
                if got is _WAIT:
                    return moved
                if got is None:
                    self._start_copy(st)
                else:
                    view, hold = got
                    self._deliver(st, st.tag, _views(view, st.specs), [hold] if hold is not None else [])
                    moved = True
                    continue
            while st.part_i < len(st.targets):
                target = st.targets[st.part_i]
                n = ch.read_some(target[st.part_got :])
                if n == 0:
                    return moved
                moved = True
                st.part_got += n
                if st.part_got == target.nbytes:
                    st.part_i += 1
                    st.part_got = 0
            self._deliver(st, st.tag, st.parts, [])

    @staticmethod
    def _skip(st: _Inbound, header) -> int | None:
        return StreamEndpoint._checked(st, wire.skip_bytes, header, st.label)

    @staticmethod
    def _decode(st: _Inbound, header) -> tuple[int, list, int]:
        return StreamEndpoint._checked(st, wire.decode_header_sized, header, st.seq, st.label)

    @staticmethod
    def _checked(st: _Inbound, read, *args):
        """read(*args), a header reader; on a corrupt header the stream from that peer is marked broken."""
        try:
            return read(*args)
        except wire.CorruptMessage as e:
            st.broken = e  # the stream from this peer can no longer be trusted
            st.match.abandon()
            raise

    @staticmethod
    def _start_copy(st: _Inbound) -> None:
        st.parts = [torch.empty(s.shape, dtype=s.dtype) for s in st.specs]
        st.targets = [_as_bytes(t) for t in st.parts if t.numel()]
        st.part_i = st.part_got = 0

    @staticmethod
    def _deliver(st: _Inbound, tag: int, parts: list[Tensor], holds: list) -> None:
        st.parts, st.targets, st.specs = None, [], None
        st.match.deliver(tag, parts, holds)

    # ------------------------------------------------------------------ progress
    def flush(self) -> None:
        if self._dirty:
            for peer in self._dirty:
                self.channels[peer].flush()
            self._dirty.clear()

    def progress(self) -> bool:
        moved = False
        self.flush()
        for peer, ch in self.channels.items():
            q = self._out[peer]
            if q:
                moved |= self._push(peer, ch, q)
            st = self._in[peer]
            if st.match.pending or st.specs is not None or st.header_got:
                moved |= self._pull(peer, ch, st)
        return moved

    def stalled_peer(self, handles: Sequence[Handle]) -> str | None:
        for h in handles:
            if not h.done and not self.channels[h.peer].alive():
                return f"rank {h.peer} ({self.channels[h.peer].name})"
        return None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for ch in self.channels.values():
            ch.close()


def fetch_key(store, key: str, timeout_s: float, what: str) -> str:
    """What a peer published under `key` in the rendezvous store, waiting at most `timeout_s` (at
    least 1 s); MscError "`what` within N s" when it never came."""
    try:
        store.wait([key], timedelta(seconds=max(1.0, timeout_s)))
    except Exception as e:  # the store raises its own timeout types
        raise MscError(f"{what} within {timeout_s:.0f} s ({e})") from None
    return store.get(key).decode()


def resolve_transport(transport: str, *, device: str, one_host: bool) -> str:
    """The concrete transport for `auto` (and a check that an explicit choice can work here)."""
    if transport == "auto":
        if device == "cuda":
            return "cuda_ipc" if one_host else "torch_dist"
        return "shm" if one_host else "tcp"
    if transport in ("shm", "cuda_ipc") and not one_host:
        raise MscError(f"transport {transport} needs every role on one host; this deployment spans hosts (use tcp or rdma)")
    if transport == "cuda_ipc" and device != "cuda":
        raise MscError("transport cuda_ipc carries GPU tensors; this bundle runs on the CPU (use shm)")
    if transport not in TRANSPORTS:
        raise MscError(f"unknown transport {transport!r}; expected one of {', '.join(TRANSPORTS)} or auto")
    return transport


def connect(transport: str, rank: int, peers: Sequence[int], store=None, *, timeout_s: float = DEFAULT_TIMEOUT_S,
            device: str = "cpu", host: str = "127.0.0.1", prefix: str = "m2n", buffer_bytes: int = 4 << 20,
            borrow: bool = False) -> Endpoint:
    """Open this rank's endpoint of `transport` to `peers`, rendezvousing through `store` (a torch Store).

    borrow: received tensors may be views of the receive buffer, valid until their handle's
    `release()` (shm and cuda_ipc; the other transports copy and ignore it).
    """
    peers = sorted(peers)
    if transport == "shm":
        from msc.backends.comm.shm import connect_shm

        return connect_shm(rank, peers, store, prefix=prefix, timeout_s=timeout_s, capacity=buffer_bytes, borrow=borrow)
    if transport == "tcp":
        from msc.backends.comm.tcp import connect_tcp

        return connect_tcp(rank, peers, store, host=host, prefix=prefix, timeout_s=timeout_s)
    if transport == "torch_dist":
        from msc.backends.comm.torch_dist import connect_torch_dist

        return connect_torch_dist(rank, peers, device=device, timeout_s=timeout_s)
    if transport == "cuda_ipc":
        from msc.backends.comm.cuda_ipc import connect_cuda_ipc

        return connect_cuda_ipc(rank, peers, store, prefix=prefix, timeout_s=timeout_s, capacity=buffer_bytes, borrow=borrow)
    if transport == "rdma":
        from msc.backends.comm.rdma import connect_rdma

        return connect_rdma(rank, peers, store, prefix=prefix, timeout_s=timeout_s, capacity=buffer_bytes)
    raise MscError(f"unknown transport {transport!r}; expected one of {', '.join(TRANSPORTS)}")
