"""The link between a serving process and its attention replicas: JSON messages over a local TCP socket.

The server (msc.runtime.serving) listens on 127.0.0.1; each attention replica connects, proves it knows
the run's token and names its replica index. Then the server sends requests ({"add": {"id", "prompt",
"params"}}), cancellations ({"cancel": id}) or {"stop": true}, and the replica answers with the events of
each step ({"events": [[id, new tokens, finish reason or null, error or null], ...]}); see
msc.runtime.roles.AttentionRole.serve.

A message is a 4-byte big-endian length and that many bytes of UTF-8 JSON: no pickle crosses the socket.
Every read has a deadline; a peer that closes its end is an MscError naming it.
"""
from __future__ import annotations

import hmac
import json
import select
import socket
import struct
import time
from typing import Callable

from msc.errors import MscError

_LEN = struct.Struct(">I")
MAX_MESSAGE = 256 << 20  # a request's prompt or a step's events as JSON; larger is a corrupt length


class Link:
    """One end of a server <-> replica connection."""

    def __init__(self, sock: socket.socket, peer: str):
        self.sock, self.peer = sock, peer
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, msg: dict) -> None:
        data = json.dumps(msg).encode()
        try:
            self.sock.sendall(_LEN.pack(len(data)) + data)
        except OSError as e:
            raise MscError(f"{self.peer} is gone (sending failed: {e})") from None

    def readable(self, timeout_s: float) -> bool:
        """True when a message (or the end of the connection) is waiting, within timeout_s."""
        ready, _, _ = select.select([self.sock], [], [], max(0.0, timeout_s))
        return bool(ready)

    def recv(self, timeout_s: float) -> dict | None:
        """The next message, or None when none starts within timeout_s; MscError when the peer closed."""
        if not self.readable(timeout_s):
            return None
        # NOTE: once a message has started, the rest of it is read with its own deadline: the sender writes a
        # message in one sendall, so a slow remainder means a stuck peer, not an idle one.
        (size,) = _LEN.unpack(self._read_exact(_LEN.size, 30.0))
        if size > MAX_MESSAGE:
            raise MscError(f"{self.peer} sent a message of {size} bytes (more than {MAX_MESSAGE}): corrupt stream")
        try:
            return json.loads(self._read_exact(size, 30.0))
        except ValueError as e:
            raise MscError(f"{self.peer} sent a message that is not JSON: {e}") from None

    def wait(self, timeout_s: float, on_idle: Callable[[], None] | None = None, idle_every_s: float = 1.0) -> dict:
        """The next message within timeout_s (MscError after it), calling on_idle every idle_every_s."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise MscError(f"no message from {self.peer} within {timeout_s:.1f} s")
            msg = self.recv(min(left, idle_every_s))
            if msg is not None:
                return msg
            if on_idle is not None:
                on_idle()

    def _read_exact(self, n: int, timeout_s: float) -> bytes:
        buf = bytearray()
        deadline = time.monotonic() + timeout_s
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not self.readable(left):
                raise MscError(f"{self.peer} stopped in the middle of a message")
            try:
                chunk = self.sock.recv(n - len(buf))
            except OSError as e:
                raise MscError(f"{self.peer} is gone (receiving failed: {e})") from None
            if not chunk:
                raise MscError(f"{self.peer} closed the connection")
            buf += chunk
        return bytes(buf)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class LinkServer:
    """The server's listening socket: accepts one authenticated connection per attention replica."""

    def __init__(self, token: str, host: str = "127.0.0.1"):
        self.token = token
        self.sock = socket.create_server((host, 0))
        self.host, self.port = self.sock.getsockname()[:2]

    def accept(self, replicas: int, timeout_s: float, check: Callable[[], None] | None = None) -> dict[int, Link]:
        """Links of replicas 0..replicas-1 once each has connected and said hello; `check` runs between
        polls (the caller raises there when a role process died); MscError after timeout_s."""
        links: dict[int, Link] = {}
        deadline = time.monotonic() + timeout_s
        while len(links) < replicas:
            if check is not None:
                check()
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(replicas)) - set(links))
                raise MscError(f"attention replicas {missing} did not connect within {timeout_s:.0f} s")
            ready, _, _ = select.select([self.sock], [], [], min(left, 0.2))
            if not ready:
                continue
            conn, _ = self.sock.accept()
            link = Link(conn, "a connecting replica")
            hello = link.wait(10.0)
            if not hmac.compare_digest(str(hello.get("token", "")), self.token):
                link.close()  # not one of ours: ignore it
                continue
            r = hello.get("replica")
            if not isinstance(r, int) or not 0 <= r < replicas or r in links:
                link.close()
                raise MscError(f"a replica connected as {r!r}; expected one of 0..{replicas - 1}, once each")
            link.peer = f"attention replica {r}"
            links[r] = link
        return links

    def close(self) -> None:
        self.sock.close()


def connect(host: str, port: int, token: str, replica: int, timeout_s: float) -> Link:
    """The replica's end: connect to the server and say hello."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as e:
        raise MscError(f"attention replica {replica} could not reach the server at {host}:{port}: {e}") from None
    sock.settimeout(None)  # reads wait through select with their own deadlines
    link = Link(sock, f"the server at {host}:{port}")
    link.send({"token": token, "replica": replica})
    return link
