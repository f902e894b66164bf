"""TCP transport: one persistent, non-blocking socket per pair of processes, on one host or across hosts.

Connecting: every rank listens on (host, an ephemeral port) and publishes the address in the
rendezvous store; for each pair the lower rank connects to the higher one and introduces itself with
its rank. TCP_NODELAY is set (messages are latency-bound, Nagle's batching would only delay them),
and the sockets are switched to non-blocking so that `Channel.write_some` / `read_some` never block.
A peer that dies closes its socket (the kernel does it), which the reader sees as end-of-stream
once it has read everything the peer sent; that is reported as a dead peer, never waited on.
"""
from __future__ import annotations

import os
import select
import socket
import struct
import time

import numpy as np

from msc.backends.comm.m2n import DEFAULT_TIMEOUT_S, StreamEndpoint, fetch_key
from msc.errors import MscError

_HELLO = struct.Struct("<8sq")
_HELLO_MAGIC = b"mscm2n01"


class TcpChannel:
    def __init__(self, peer: int, sock: socket.socket):
        self.sock, self.peer = sock, peer
        self.name = f"tcp {sock.getpeername()[0]}:{sock.getpeername()[1]}"
        self._dead = False
        sock.setblocking(False)

    def write_some(self, data: np.ndarray) -> int:
        if self._dead:
            return 0
        try:
            return self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:  # reset / broken pipe: the peer is gone
            self._dead = True
            return 0

    def read_some(self, into: np.ndarray) -> int:
        if self._dead or into.nbytes == 0:
            return 0
        try:
            n = self.sock.recv_into(into)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            self._dead = True
            return 0
        if n == 0:  # orderly end-of-stream: the peer closed (or died) after everything it sent
            self._dead = True
        return n

    def alive(self) -> bool:
        if not self._dead:
            # Probe for end-of-stream without consuming data, so that a waiting sender notices too.
            try:
                if self.sock.recv(1, socket.MSG_PEEK) == b"":
                    self._dead = True
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self._dead = True
        return not self._dead

    def flush(self) -> None:
        pass

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class TcpEndpoint(StreamEndpoint):
    transport = "tcp"

    def idle(self, idle_s: float, budget_s: float) -> None:
        # As shm does: poll and yield the core for a short window, then sleep in select() until any of
        # our sockets is readable (or writable, if we have bytes queued): the kernel's wake-up.
        if idle_s < 300e-6:
            os.sched_yield()
            return
        socks = [ch.sock for ch in self.channels.values() if not ch._dead]
        wants_write = [self.channels[p].sock for p, q in self._out.items() if q and not self.channels[p]._dead]
        if socks:
            select.select(socks, wants_write, [], min(1e-3, max(budget_s, 1e-5)))
        else:
            time.sleep(min(1e-3, max(budget_s, 1e-5)))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise MscError("tcp: a peer closed the connection during the handshake")
        buf += chunk
    return buf


def connect_tcp(rank: int, peers: list[int], store, *, host: str = "127.0.0.1", prefix: str = "m2n",
                timeout_s: float = DEFAULT_TIMEOUT_S) -> TcpEndpoint:
    """Listen on `host`, publish the address in `store`, connect to every peer; return the endpoint.

    `host` is the address peers reach this rank at (127.0.0.1 for one host; the node's address on a
    cluster); the listener binds to that address only.
    """
    peers = sorted(peers)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, 0))
    except OSError as e:
        listener.close()
        raise MscError(f"tcp: rank {rank} cannot listen on {host}: {e}") from None
    listener.listen(len(peers) + 1)
    socks: dict[int, socket.socket] = {}
    deadline = time.monotonic() + timeout_s
    try:
        store.set(f"{prefix}/tcp/{rank}", f"{host}:{listener.getsockname()[1]}")
        for p in (p for p in peers if p > rank):  # we dial the higher ranks ...
            key = f"{prefix}/tcp/{p}"
            addr, port = fetch_key(store, key, deadline - time.monotonic(),
                                   f"tcp: rank {p} did not publish its address").rsplit(":", 1)
            s = socket.create_connection((addr, int(port)), timeout=max(1.0, deadline - time.monotonic()))
            s.sendall(_HELLO.pack(_HELLO_MAGIC, rank))
            socks[p] = s
        expected = {p for p in peers if p < rank}  # ... and the lower ranks dial us
        while expected:
            listener.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                s, _ = listener.accept()
            except socket.timeout:
                raise MscError(f"tcp: rank(s) {sorted(expected)} did not connect to rank {rank} within {timeout_s:.0f} s") from None
            s.settimeout(max(1.0, deadline - time.monotonic()))
            magic, who = _HELLO.unpack(_recv_exact(s, _HELLO.size))
            if magic != _HELLO_MAGIC or who not in expected:
                s.close()
                raise MscError(f"tcp: rank {rank} got an unexpected connection (hello {magic!r}, rank {who})")
            expected.discard(who)
            socks[who] = s
    except BaseException:
        for s in socks.values():
            s.close()
        raise
    finally:
        listener.close()
    for s in socks.values():
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return TcpEndpoint(rank, {p: TcpChannel(p, s) for p, s in socks.items()}, timeout_s)
