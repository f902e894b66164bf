"""The server <-> attention replica link: framing, authentication, and failures as errors, not hangs."""
from __future__ import annotations

import threading
import time

import pytest

from msc.errors import MscError
from msc.runtime import serve_link


def _pair(replica: int = 0, replicas: int = 1):
    server = serve_link.LinkServer("secret")
    box = {}
    t = threading.Thread(target=lambda: box.update(link=serve_link.connect(server.host, server.port, "secret", replica, 5.0)))
    t.start()
    links = server.accept(replicas, timeout_s=10.0)
    t.join(timeout=10)
    return server, links[replica], box["link"]


def test_messages_cross_both_ways_whole_and_in_order():
    server, at_server, at_replica = _pair()
    big = list(range(200_000))  # ~1.3 MB of JSON: several socket reads
    for i in range(3):
        at_server.send({"add": i, "prompts": [big if i == 1 else [i]]})
    for i in range(3):
        msg = at_replica.wait(5.0)
        assert msg["add"] == i and msg["prompts"] == [big if i == 1 else [i]]
    at_replica.send({"events": [["r0", [1, 2], None, None]]})
    assert at_server.wait(5.0) == {"events": [["r0", [1, 2], None, None]]}
    assert at_server.peer == "attention replica 0"
    server.close()


def test_a_wrong_token_is_turned_away_and_the_right_replica_still_gets_in():
    server = serve_link.LinkServer("secret")
    intruder = serve_link.connect(server.host, server.port, "guess", 0, 5.0)
    box = {}
    t = threading.Thread(target=lambda: box.update(link=serve_link.connect(server.host, server.port, "secret", 0, 5.0)))
    t.start()
    links = server.accept(1, timeout_s=10.0)
    t.join(timeout=10)
    links[0].send({"ping": 1})
    assert box["link"].wait(5.0) == {"ping": 1}
    with pytest.raises(MscError, match="closed the connection"):
        intruder.wait(5.0)  # the server hung up on it
    server.close()


def test_a_replica_index_out_of_range_is_an_error():
    server = serve_link.LinkServer("secret")
    serve_link.connect(server.host, server.port, "secret", 3, 5.0)
    with pytest.raises(MscError, match=r"connected as 3; expected one of 0..1"):
        server.accept(2, timeout_s=10.0)
    server.close()


def test_accept_names_the_replicas_that_never_came_and_runs_the_check():
    server = serve_link.LinkServer("secret")
    calls = []
    t0 = time.monotonic()
    with pytest.raises(MscError, match=r"replicas \[0, 1\] did not connect within 1 s"):
        server.accept(2, timeout_s=1.0, check=lambda: calls.append(1))
    assert time.monotonic() - t0 < 5 and calls
    server.close()


def test_a_closed_peer_and_a_silent_peer_are_errors_with_idle_callbacks_meanwhile():
    server, at_server, at_replica = _pair()
    idles = []
    with pytest.raises(MscError, match="no message from attention replica 0 within 0.6 s"):
        at_server.wait(0.6, on_idle=lambda: idles.append(1), idle_every_s=0.1)
    assert len(idles) >= 3  # called every 0.1 s while nothing came
    at_replica.close()
    with pytest.raises(MscError, match="attention replica 0 closed the connection"):
        at_server.wait(5.0)
    server.close()


def test_a_corrupt_length_is_refused():
    server, at_server, at_replica = _pair()
    at_replica.sock.sendall(b"\xff\xff\xff\xff")
    with pytest.raises(MscError, match="corrupt stream"):
        at_server.wait(5.0)
    server.close()
