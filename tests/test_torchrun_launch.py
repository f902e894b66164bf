"""`msc launch --engine torchrun`: two "nodes" on loopback (two launch commands, one c10d rendezvous) give
transformers' tokens; a node that never joins is named; a role that dies is named with its node, and
nothing is left behind."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from msc.runtime.torchrun_launch import node_counts
from msc.runtime.worker import FAULT_AFTER, FAULT_ROLE
from msc.verify import reference_generate
from tests.test_reliability import worker_pids

PROMPTS = [[5, 17, 42], [7, 7], [1, 2, 3, 4]]


def free_port_pair() -> int:
    """A port p with p and p + 1 free (the rendezvous and the job store)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two adjacent free ports")


def launch(bundle, node_rank: int, port: int, *extra: str, nnodes: int = 2, env: dict | None = None) -> subprocess.Popen:
    ids = [a for p in PROMPTS for a in ("--input-ids", ",".join(map(str, p)))]
    return subprocess.Popen([sys.executable, "-P", "-m", "msc.cli", "launch", str(bundle), "--engine", "torchrun",
                             "--nnodes", str(nnodes), "--node-rank", str(node_rank), "--rdzv-endpoint", f"127.0.0.1:{port}",
                             *ids, "--max-new-tokens", "6", "--json", *extra],
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def own_bundle(tiny_bundle, tmp_path):
    """A copy of the tiny bundle under its own path (role processes are found by it)."""
    b = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.path, b)
    return b


def test_node_counts_split_the_roles_evenly():
    assert node_counts(3, 2) == [2, 1] and node_counts(7, 3) == [3, 2, 2] and node_counts(4, 4) == [1] * 4
    assert sum(node_counts(11, 4)) == 11


def test_two_nodes_on_loopback_give_transformers_tokens(own_bundle, tiny_hf):
    port = free_port_pair()
    nodes = [launch(own_bundle, 1, port), launch(own_bundle, 0, port)]  # node 1 first: the order does not matter
    outs = [p.communicate(timeout=300) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], [o[1][-2000:] for o in outs]
    result = json.loads(outs[1][0])  # node 0 prints the outputs
    assert result["outputs"] == [reference_generate(tiny_hf, p, 6) for p in PROMPTS]
    assert outs[0][0].strip() == ""  # node 1 prints nothing on stdout
    assert not worker_pids(str(own_bundle))


def test_a_node_that_never_joins_is_named_after_the_timeout(own_bundle):
    port = free_port_pair()
    t0 = time.monotonic()
    node0 = launch(own_bundle, 0, port, "--join-timeout", "3")
    _, stderr = node0.communicate(timeout=120)
    assert node0.returncode == 1
    assert "node rank(s) [1] did not join the rendezvous" in stderr
    assert time.monotonic() - t0 < 60  # the join timeout bounds it (start-up included)
    assert not worker_pids(str(own_bundle))


def test_a_dying_role_is_named_with_its_node_and_nothing_is_left(own_bundle):
    port = free_port_pair()
    fault = {FAULT_ROLE: "expert.1", FAULT_AFTER: "2"}  # expert.1 exits abruptly in its second batch
    nodes = [launch(own_bundle, 0, port, env=fault), launch(own_bundle, 1, port, env=fault)]
    outs = [p.communicate(timeout=300) for p in nodes]
    assert nodes[0].returncode == 1
    # expert.1 is rank 2: wherever the rendezvous put it, node 0 names it (not a peer that only lost it)
    assert "role expert.1 (rank 2) on node" in outs[0][1] and "ended abruptly" in outs[0][1], outs[0][1][-2000:]
    assert not worker_pids(str(own_bundle))


def test_serving_across_two_nodes(own_bundle, tiny_hf):
    """`--serve`: node 0 answers HTTP with the replicas and expert nodes spread over both nodes; Ctrl-C on
    node 0 stops every role on both."""
    import signal

    import httpx

    port = free_port_pair()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        http_port = s.getsockname()[1]
    nodes = [launch(own_bundle, 1, port, "--serve"), launch(own_bundle, 0, port, "--serve", "--port", str(http_port))]
    try:
        url = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert all(p.poll() is None for p in nodes), [p.communicate()[1][-2000:] for p in nodes if p.poll() is not None]
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        for prompt in PROMPTS:
            r = httpx.post(f"{url}/v1/generate", json={"prompt_token_ids": prompt, "max_new_tokens": 6}, timeout=60)
            assert r.status_code == 200 and r.json()["token_ids"] == reference_generate(tiny_hf, prompt, 6)
        nodes[1].send_signal(signal.SIGINT)  # node 0 (started second)
        outs = [p.communicate(timeout=60) for p in nodes]
        assert [p.returncode for p in nodes] == [0, 0], [o[1][-2000:] for o in outs]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=10)
    assert not worker_pids(str(own_bundle))
