"""Every CPU transport of the M2N library, across real processes: correctness, dead and silent peers,
corrupted headers. (cuda_ipc and rdma have their own files: they need hardware this machine may lack.)"""
from __future__ import annotations

import pytest

from tests.comm.harness import run_ranks

CPU_TRANSPORTS = ["shm", "tcp", "torch_dist"]
SIZES = [0, 1, 2048, 256 << 10, 3 << 20]  # empty, a ragged byte, 2 KB, 256 KB, 3 MB (> the 1 MB shm ring)
SHAPES = [(m, n) for m in (1, 2, 3) for n in (1, 2, 3)]


@pytest.mark.parametrize("transport", CPU_TRANSPORTS + ["shm-borrow"])
def test_m_to_n_exchange_is_exact_for_every_shape_and_size(transport):
    # Six processes; each (M, N) round uses the first M + N of them with fresh connections.
    # shm-borrow: received tensors are views of the ring (stashed out-of-order messages hold ring space).
    args = {"transport": transport.split("-")[0], "borrow": transport.endswith("borrow"), "shapes": SHAPES, "sizes": SIZES}
    results = run_ranks("tests.comm.scenarios:exchange", 6, args, timeout_s=240)
    # Each sender checks one reply per (receiver, size); each receiver checks one message per (sender, size).
    expected = [sum(n * len(SIZES) if r < m else (m * len(SIZES) if r < m + n else 0) for m, n in SHAPES) for r in range(6)]
    assert [res["checked"] for res in results] == expected


@pytest.mark.parametrize("transport", CPU_TRANSPORTS)
def test_dead_peer_is_an_error_naming_it_within_the_timeout(transport):
    timeout = 20.0
    res = run_ranks("tests.comm.scenarios:dies_midway", 2, {"transport": transport, "timeout_s": timeout},
                    timeout_s=90, expect_fail={1})
    assert res[1]["code"] == 3
    err = res[0]["error"]
    assert err is not None and "1" in err
    if transport == "torch_dist":
        assert res[0]["seconds"] <= timeout + 5  # gloo cannot tell a dead peer from a slow one: the timeout fires
    else:
        assert res[0]["seconds"] < 5  # shm watches the peer's pid, tcp sees the socket close: no need to time out
        assert "died or closed" in err


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_silent_peer_times_out_with_a_clear_error(transport):
    res = run_ranks("tests.comm.scenarios:silent_peer", 2, {"transport": transport, "timeout_s": 20.0, "wait_s": 1.0},
                    timeout_s=90)
    assert res[0]["error"] is not None and "waited 1.0 s on peer(s) [1]" in res[0]["error"]
    assert 1.0 <= res[0]["seconds"] < 4.0


@pytest.mark.parametrize("transport", CPU_TRANSPORTS)
def test_corrupted_header_is_a_clear_error(transport):
    res = run_ranks("tests.comm.scenarios:corrupt_header", 2, {"transport": transport, "timeout_s": 20.0}, timeout_s=90)
    assert res[1]["error"] is not None and "corrupted header from rank 0" in res[1]["error"]


@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a veth pair: separate network stacks, as two hosts would have."""
    import os
    import subprocess

    tag = f"msc{os.getpid() % 100000}"
    ns, links = [f"{tag}a", f"{tag}b"], [f"{tag}va", f"{tag}vb"]
    ips = ["10.77.0.1", "10.77.0.2"]
    steps = [["ip", "netns", "add", ns[0]], ["ip", "netns", "add", ns[1]],
             ["ip", "link", "add", links[0], "type", "veth", "peer", "name", links[1]]]
    for i in range(2):
        steps += [["ip", "link", "set", links[i], "netns", ns[i]], ["ip", "-n", ns[i], "addr", "add", f"{ips[i]}/24", "dev", links[i]],
                  ["ip", "-n", ns[i], "link", "set", links[i], "up"], ["ip", "-n", ns[i], "link", "set", "lo", "up"]]
    try:
        for cmd in steps:
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                pytest.skip(f"cannot make network namespaces here ({' '.join(cmd)}: {r.stderr.strip()}); tcp is tested over loopback")
        yield ns, ips
    finally:
        for n in ns:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)


def test_tcp_between_two_network_namespaces(two_hosts):
    ns, ips = two_hosts
    res = run_ranks("tests.comm.scenarios:exchange", 2,
                    {"transport": "tcp", "shapes": [(1, 1)], "sizes": SIZES, "hosts": ips}, timeout_s=120, netns=ns)
    assert [r["checked"] for r in res] == [len(SIZES), len(SIZES)]
