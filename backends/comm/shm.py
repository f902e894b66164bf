"""Shared-memory transport: processes on one host exchange CPU tensors through ring buffers in /dev/shm.

Each process owns one *mailbox*, a file in /dev/shm that holds its pre-registered receive buffers:

  page 0        doorbell (int32 futex word at byte 0), owner pid (int64 at byte 8), owner asleep (byte 16)
  ring i        control page + `capacity` data bytes, written only by peer i (single producer,
                single consumer: the mailbox owner)

A ring's control page holds, each on its own cache line:
  word 0  write position (bytes ever written; stored only by the sender)   word 1 sender pid
  word 2  sender closed                                                    word 3 sender wants space
  word 8  read position (bytes ever read; stored only by the receiver)     word 10 receiver closed
  word 16 magic                                                            word 17 capacity

Connecting: every process creates its mailbox and publishes its path in the rendezvous store; every
sender maps its peers' mailboxes; the last one to attach unlinks the name, so nothing is left in
/dev/shm however the processes end later.

Sending copies the payload once into the receiver's ring and then publishes the new write position:
that store is the completion signal (the "write with immediate" of the RDMA model). Then the sender
rings the receiver's doorbell: a futex word that the receiver sleeps on when it has nothing to do, so
an idle role costs no CPU and wakes within microseconds, which matters when roles outnumber cores.

NOTE: ordering relies on x86-64's total store order: the payload copy is complete before the 8-byte
aligned store of the new write position becomes visible, and a reader that sees the new position sees
the payload. On weakly ordered CPUs (ARM) this needs explicit fences, so the transport refuses to
start there rather than risk silent corruption.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import platform
import secrets

from collections import deque

import numpy as np

from msc import env as msc_env
from msc.backends.comm import wire
from msc.backends.comm.m2n import _WAIT, DEFAULT_TIMEOUT_S, StreamEndpoint, fetch_key
from msc.errors import MscError
from msc.runtime.lifecycle import shm_name_prefix

SHM_DIR = "/dev/shm"
DEFAULT_CAPACITY = 4 << 20


def _default_spin_s() -> float:
    """How long a waiting endpoint polls before it sleeps on its doorbell (MSC_SHM_SPIN_US overrides).

    NOTE: measured both ways. On a 2-core VM, where roles outnumber cores, 300 us is best (a spinning rank
    takes turns with the ones doing work; longer spins were no better, docs/notes.md). On the 16-core H200
    host a sleeping receiver woke ~0.2 ms late: spinning 5 ms cut a cuda_ipc round trip from 849 to 638 us
    and two role processes' decode step from 76.9 to 65.8 ms (docs/gpu.md). So: long spins where cores
    are plenty (more than 4 usable), short ones otherwise. Polling yields the core, so it costs others
    little, but it does show as CPU time."""
    spin_us = msc_env.number("MSC_SHM_SPIN_US")
    if spin_us is not None:
        return spin_us * 1e-6
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return 300e-6 if cores <= 4 else 5e-3


DEFAULT_SPIN_S = _default_spin_s()
PAGE = 4096
_MAGIC = 0x52494E474D534331  # "RINGMSC1"
W_POS, W_PID, W_CLOSED, W_WANTS_SPACE, R_POS, R_CLOSED, MAGIC_W, CAP_W = 0, 1, 2, 3, 8, 10, 16, 17

_libc = ctypes.CDLL(None, use_errno=True)
_memmove = ctypes.memmove
_SYS_FUTEX = 202  # x86-64
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1  # shared (not PRIVATE): the word lives in a mapping of several processes


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class Doorbell:
    """A futex word in shared memory: one process sleeps on it, any peer rings it."""

    def __init__(self, mm: mmap.mmap, offset: int):
        self.word = ctypes.c_int32.from_buffer(mm, offset)
        self.asleep = ctypes.c_int64.from_buffer(mm, offset + 16)
        self.addr = ctypes.c_void_p(ctypes.addressof(self.word))

    def value(self) -> int:
        return self.word.value

    def ring(self, stamp: int) -> None:
        # NOTE: each ring stores a value unique to this sender and message (not an increment, which two
        # senders could race on), so a receiver that read the old value never sleeps through it. The
        # wake-up system call is made only when the owner said it is asleep: waking a process costs the
        # waker dearly when cores are oversubscribed (the woken one preempts it). A wake-up lost to
        # the tiny race between the two flags costs at most the owner's bounded sleep (1 ms).
        self.word.value = stamp
        if self.asleep.value:
            _libc.syscall(_SYS_FUTEX, self.addr, _FUTEX_WAKE, 1 << 30, None, None, 0)

    def sleep(self, seen: int, timeout_s: float) -> None:
        """Block until the word differs from `seen`, someone rings, or `timeout_s` passes."""
        ts = _Timespec(int(timeout_s), int((timeout_s % 1) * 1e9))
        self.asleep.value = 1
        try:
            _libc.syscall(_SYS_FUTEX, self.addr, _FUTEX_WAIT, ctypes.c_int32(seen), ctypes.byref(ts), None, 0)
        finally:
            self.asleep.value = 0

    def release(self) -> None:
        self.word = self.asleep = None  # drop the buffer exports so the mapping can go


def _state_alive(stat: bytes) -> bool:
    """Whether a /proc/PID/stat text says the process still runs (neither zombie nor dead)."""
    state = stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3]
    return state not in (b"Z", b"X")


class PidWatch:
    """Whether one process still runs (not a zombie), asked often: cuda_ipc asks before every write into a
    peer's memory, shm whenever a wait looks for a dead peer.

    NOTE: the /proc file is opened once and re-read with pread (a few µs, against tens for open + read +
    close). The open file keeps naming the process it was opened for: once that process is reaped, reads
    fail (it is dead), even if its pid has been reused since."""

    def __init__(self, pid: int):
        self.pid = pid
        try:
            self.fd: int | None = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
        except OSError:
            self.fd = None

    def alive(self) -> bool:
        if self.fd is None:
            return False
        try:
            return _state_alive(os.pread(self.fd, 1024, 0))
        except (OSError, ValueError):
            return False

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Ring:
    """One single-producer single-consumer byte ring inside a mailbox mapping."""

    def __init__(self, mm: mmap.mmap, offset: int, capacity: int, create: bool):
        self.ctrl = np.frombuffer(mm, dtype=np.int64, count=PAGE // 8, offset=offset)
        if create:
            self.ctrl[MAGIC_W], self.ctrl[CAP_W] = _MAGIC, capacity
        elif int(self.ctrl[MAGIC_W]) != _MAGIC or int(self.ctrl[CAP_W]) != capacity:
            raise MscError("shared-memory mailbox does not hold an msc ring where expected")
        self.capacity = capacity
        self.data = np.frombuffer(mm, dtype=np.uint8, offset=offset + PAGE, count=capacity)
        # NOTE: the positions are read and written on every poll: ctypes words cost about a third of numpy
        # scalar indexing (same 8-byte aligned loads and stores, so the ordering argument is unchanged).
        self.w_pos = ctypes.c_int64.from_buffer(mm, offset + 8 * W_POS)
        self.r_pos = ctypes.c_int64.from_buffer(mm, offset + 8 * R_POS)
        self.wants_space = ctypes.c_int64.from_buffer(mm, offset + 8 * W_WANTS_SPACE)
        self.r_closed = ctypes.c_int64.from_buffer(mm, offset + 8 * R_CLOSED)
        # For whole-message writes and reads (put_message / take_message): the data area as a memoryview
        # (headers) and its address (payload copies straight from a tensor's memory with memmove).
        # NOTE: the address stays valid while this ring lives: `data` and `mv` keep the mapping alive.
        self.mv = memoryview(mm)[offset + PAGE : offset + PAGE + capacity]
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(mm, offset + PAGE))
        # Receiver-side state: `cursor` is how far we have read; R_POS (what the sender sees as free)
        # stops at the oldest byte still lent out by `borrow`.
        self.cursor = int(self.ctrl[R_POS])
        self.holds: deque[list] = deque()  # [start, end, released]

    def write_some(self, src: np.ndarray) -> int:
        cap = self.capacity
        w = self.w_pos.value
        n = cap - (w - self.r_pos.value)
        if src.nbytes < n:
            n = src.nbytes
        if n <= 0:
            self.wants_space.value = 1
            return 0
        at = w % cap
        first = min(n, cap - at)
        self.data[at : at + first] = src[:first]
        if n > first:
            self.data[: n - first] = src[first:n]
        self.w_pos.value = w + n  # publish: the payload is in place before the position moves
        return n

    def put_message(self, header: bytearray, parts: list[tuple[int, int]], payload: int) -> bool:
        """Write a whole message (header, then each part given as (address, bytes)) and publish it with one
        store; False, writing nothing, when the ring lacks room for all of it.

        NOTE: a message that would wrap around the ring's end is put at the ring's start instead, behind a
        skip record (wire.encode_skip) over the rest of the ring, when there is room for both: the receiver
        can then lend it in place; a wrapped message would be copied out into a fresh allocation (page
        faults: above 2 MB messages, shm's p99 was worse than gloo's before this)."""
        cap = self.capacity
        w = self.w_pos.value
        hb = len(header)
        need = hb + payload
        free = cap - (w - self.r_pos.value)
        if free < need:
            return False
        at = w % cap
        if at + need > cap and at + hb <= cap and cap - at + need <= free:
            self.mv[at : at + hb] = wire.encode_skip(cap - at - hb)
            w, at = w + cap - at, 0
        if at + hb <= cap:
            self.mv[at : at + hb] = header
        else:
            first = cap - at
            self.mv[at:] = header[:first]
            self.mv[: hb - first] = header[first:]
        at = (at + hb) % cap
        base = self.base
        for addr, n in parts:
            first = cap - at
            if n <= first:
                _memmove(base + at, addr, n)
            else:
                _memmove(base + at, addr, first)
                _memmove(base, addr + first, n - first)
            at = (at + n) % cap
        self.w_pos.value = w + need  # publish: skip record, header and payload are in place
        return True

    def next_header(self, hb: int):
        """The next message's header in place (a memoryview of hb bytes) once it has all arrived and does not
        wrap around the ring's end; else None."""
        r = self.cursor
        if self.w_pos.value - r < hb:
            return None
        at = r % self.capacity
        if at + hb > self.capacity:
            return None
        return self.mv[at : at + hb]

    def take_message(self, hb: int, payload: int):
        """Lend the message whose header next_header returned: (payload in place, its ring offset, hold) once
        all of it has arrived and the payload does not wrap; None otherwise (then read it the usual way).
        The hold covers header and payload; `release` gives both back."""
        r = self.cursor
        at = r % self.capacity + hb
        if self.w_pos.value - r < hb + payload or at + payload > self.capacity:
            return None
        hold = [r, r + hb + payload, False]
        self.holds.append(hold)
        self.cursor = r + hb + payload
        return self.data[at : at + payload], at, hold

    def discard(self, n: int) -> None:
        """Pass over the next n bytes (a skip record and what it covers); they must have arrived."""
        self.cursor += n
        self._advance()

    def read_some(self, dst: np.ndarray) -> int:
        cap, r = self.capacity, self.cursor
        n = self.w_pos.value - r
        if n <= 0:
            return 0
        if dst.nbytes < n:
            n = dst.nbytes
        at = r % cap
        first = min(n, cap - at)
        dst[:first] = self.data[at : at + first]
        if n > first:
            dst[first:n] = self.data[: n - first]
        self.cursor = r + n
        self._advance()
        return n

    def borrow(self, n: int):
        """(view of the next n bytes in place, hold) once all n have arrived; _WAIT until then; None
        when they cannot be lent (they wrap around the ring's end, or waiting could deadlock)."""
        at = self.cursor % self.capacity
        if at + n > self.capacity:
            return None
        if self.w_pos.value - self.cursor < n:
            # Waiting is safe only while nothing else is lent out: then the sender always gets room.
            return _WAIT if not self.holds else None
        hold = [self.cursor, self.cursor + n, False]
        self.holds.append(hold)
        self.cursor += n
        return self.data[at : at + n], hold

    def release(self, hold: list) -> None:
        hold[2] = True
        self._advance()

    def _advance(self) -> None:
        holds = self.holds
        while holds and holds[0][2]:
            holds.popleft()
        self.r_pos.value = holds[0][0] if holds else self.cursor

    def unread(self) -> int:
        return self.w_pos.value - self.cursor


class Mailbox:
    """A process's receive file: a doorbell page and one ring per peer that sends to it."""

    def __init__(self, path: str, senders: list[int], capacity: int, create: bool):
        self.path, self.senders, self.capacity = path, list(senders), capacity
        size = PAGE + len(senders) * (PAGE + capacity)
        fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            elif os.fstat(fd).st_size != size:
                raise MscError(f"{path} is {os.fstat(fd).st_size} bytes, expected an msc mailbox of {size}")
            # NOTE: MAP_POPULATE faults every page in now, once (the "registration" of the receive buffers):
            # otherwise the first pass of each ring takes a page fault per 4 KB in the sender and the
            # receiver, which showed up as the p99 of the first messages (measured: docs/notes.md).
            self.mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        finally:
            os.close(fd)
        self.head = np.frombuffer(self.mm, dtype=np.int64, count=2)
        if create:
            self.head[1] = os.getpid()
        self.bell = Doorbell(self.mm, 0)
        self.rings = {p: Ring(self.mm, PAGE + i * (PAGE + capacity), capacity, create) for i, p in enumerate(senders)}

    @property
    def owner_pid(self) -> int:
        return int(self.head[1])

    def release(self) -> None:
        self.bell.release()
        self.rings, self.head = {}, None


class ShmChannel:
    """Both directions to one peer: we write into the peer's mailbox and read from our own."""

    def __init__(self, rank: int, peer: int, mine: Mailbox, theirs: Mailbox):
        self.name = f"shm {theirs.path}"
        self.inbound, self.out = mine.rings[peer], theirs.rings[rank]
        self.my_bell, self.peer_bell = mine.bell, theirs.bell
        self.peer_watch = PidWatch(theirs.owner_pid)
        self._stamp = (rank % 128) << 24
        self._count = 0

    def write_some(self, data: np.ndarray) -> int:
        if self.out.r_closed.value:
            return 0
        return self.out.write_some(data)

    def put_message(self, header: bytearray, parts: list[tuple[int, int]], payload: int) -> bool:
        if self.out.r_closed.value:
            return False
        return self.out.put_message(header, parts, payload)

    def next_header(self, hb: int):
        return self.inbound.next_header(hb)

    def take_message(self, hb: int, payload: int):
        return self.inbound.take_message(hb, payload)

    def discard(self, n: int) -> None:
        self.inbound.discard(n)
        self._room_freed()

    def flush(self) -> None:
        self._count = (self._count + 1) & 0xFFFFFF
        self.peer_bell.ring(self._stamp | self._count)

    def read_some(self, into: np.ndarray) -> int:
        n = self.inbound.read_some(into)
        if n:
            self._room_freed()
        return n

    def borrow(self, n: int):
        return self.inbound.borrow(n)

    def release(self, hold: list) -> None:
        self.inbound.release(hold)
        self._room_freed()

    def _room_freed(self) -> None:
        if self.inbound.wants_space.value:
            self.inbound.wants_space.value = 0
            self.peer_bell.ring(self._stamp | 0xFFFFFF)  # the sender waits for room: tell it there is some

    def alive(self) -> bool:
        if self.inbound.unread() > 0:
            return True  # whatever it sent before it went is still ours to read
        if int(self.inbound.ctrl[W_CLOSED]) or self.out.r_closed.value:
            return False
        return self.peer_watch.alive()

    def close(self) -> None:
        self.inbound.ctrl[R_CLOSED] = 1
        self.out.ctrl[W_CLOSED] = 1
        self.peer_bell.ring(self._stamp)  # a peer asleep on us learns at once that we are gone
        self.peer_watch.close()


class ShmEndpoint(StreamEndpoint):
    transport = "shm"

    def __init__(self, rank, channels, mailbox: Mailbox, peer_boxes: list[Mailbox], timeout_s, spin_s: float = DEFAULT_SPIN_S,
                 borrow: bool = False):
        super().__init__(rank, channels, timeout_s, borrow=borrow)
        self.mailbox, self._peer_boxes, self.spin_s = mailbox, peer_boxes, spin_s

    def idle(self, idle_s: float, budget_s: float) -> None:
        # NOTE: for the first `spin_s` of a wait, poll and yield the core (sched_yield lets a peer
        # that shares it run; on an idle core it returns at once): a message in flight usually lands
        # within that window and is seen without any wake-up. After it, sleep on our doorbell; a peer
        # that writes to us, or frees room we wait for, wakes us. Measured on a 2-core VM, waking a
        # sleeper costs 100-200 us, so spinning first halves the round trip at M = N = 1 and still
        # helps when roles outnumber cores. The bounded sleep caps a missed wake-up at 1 ms.
        if idle_s < self.spin_s:
            os.sched_yield()
            return
        seen = self.mailbox.bell.value()
        if self.progress():
            return
        self.mailbox.bell.sleep(seen, min(1e-3, max(budget_s, 1e-5)))

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        try:
            os.unlink(self.mailbox.path)  # in case some peer never attached
        except FileNotFoundError:
            pass
        for box in [self.mailbox, *self._peer_boxes]:
            box.release()


def connect_shm(rank: int, peers: list[int], store, *, prefix: str = "m2n", timeout_s: float = DEFAULT_TIMEOUT_S,
                capacity: int = DEFAULT_CAPACITY, spin_s: float = DEFAULT_SPIN_S, borrow: bool = False) -> ShmEndpoint:
    """Create this rank's mailbox, publish it in `store`, map the peers' mailboxes; return the endpoint.

    `store` is a torch.distributed Store (TCPStore under torchrun / msc run) shared by all the ranks.
    """
    if platform.machine() not in ("x86_64", "AMD64"):
        raise MscError(f"the shm transport relies on x86-64 store ordering; this CPU is {platform.machine()}: use tcp")
    if not os.path.isdir(SHM_DIR):
        raise MscError(f"the shm transport needs {SHM_DIR}; use tcp on this system")
    if capacity < PAGE or capacity % 64:
        raise MscError(f"shm ring capacity must be a multiple of 64 bytes and at least {PAGE}, got {capacity}")
    peers = sorted(peers)
    mine = Mailbox(f"{SHM_DIR}/{shm_name_prefix()}{secrets.token_hex(6)}-rank{rank}", peers, capacity, create=True)
    theirs: dict[int, Mailbox] = {}
    try:
        store.set(f"{prefix}/shm/box/{rank}", f"{mine.path}\n{','.join(map(str, peers))}")
        for p in peers:
            key = f"{prefix}/shm/box/{p}"
            path, senders = fetch_key(store, key, timeout_s, f"shm: rank {p} did not publish its mailbox").split("\n")
            senders = [int(s) for s in senders.split(",") if s]
            if rank not in senders:
                raise MscError(f"shm: rank {p} does not expect messages from rank {rank} (its peers: {senders})")
            theirs[p] = Mailbox(path, senders, capacity, create=False)
            theirs[p].rings[rank].ctrl[W_PID] = os.getpid()
            if store.add(f"{prefix}/shm/attached/{p}", 1) == len(senders):
                os.unlink(path)  # every sender has mapped it: the name is no longer needed
    except BaseException:
        try:
            os.unlink(mine.path)
        except FileNotFoundError:
            pass
        raise
    channels = {p: ShmChannel(rank, p, mine, theirs[p]) for p in peers}
    return ShmEndpoint(rank, channels, mine, list(theirs.values()), timeout_s, spin_s, borrow)
