"""The device exchange's pieces on the CPU: area layout, when it turns on, the dispatch / combine protocol
between threads (against an independent computation), expired waits, and a dead expert node in a real run.
The GPU side (Triton flag kernels, CUDA graphs) is tested by tests/engine/test_engine_gpu.py."""
from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.distributed as dist

from msc.backends.comm.m2n import PeerError
from msc.errors import MscError
from msc.runtime import device_exchange as dx
from msc.runtime.launcher import run_bundle
from msc.runtime.worker import FAULT_AFTER, FAULT_ROLE

DIMS = dx.Dims(hidden=8, top_k=2, dtype=torch.bfloat16, layers=3, max_rows=5, microbatches=2)


@pytest.mark.parametrize("kind", ["fwd", "ret"])
def test_area_parts_are_disjoint_aligned_and_inside_the_buffer(kind):
    layout, nbytes = dx._layout(kind, DIMS)
    spans = []
    for name, at, dt, shape in layout:
        n = torch.Size(shape).numel() * torch.tensor([], dtype=dt).element_size()
        assert at % 256 == 0 and at + n <= nbytes
        spans.append((at, at + n))
    spans.sort()
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    area = dx.Area(torch.zeros(nbytes, dtype=torch.uint8), kind, DIMS)
    assert area["flags"].shape == (DIMS.layers * dx.MAX_MICROBATCHES,)
    names = {"fwd": ["hidden", "ids", "weights"], "ret": ["out"]}[kind]
    assert sorted(area.views) == sorted(["flags"] + [f"{n}{mb}" for n in names for mb in range(2)])


@pytest.mark.parametrize("env,kw,expect", [
    ("auto", {}, False),  # one GPU, no MPS: the roles would time-slice it
    ("auto", {"distinct_gpus": True}, True),
    ("auto", {"mps": True}, True),
    ("auto", {"mps": True, "replicas": 2}, False),  # several replicas: never (see the module's NOTE)
    ("auto", {"mps": True, "tp_size": 2}, False),
    ("auto", {"mps": True, "delays": True}, False),
    ("auto", {"mps": True, "transport": "tcp"}, False),
    ("off", {"mps": True}, False),
    ("on", {"device": "cpu", "transport": "shm"}, True),
])
def test_when_it_turns_on(monkeypatch, env, kw, expect):
    monkeypatch.setenv(dx.ENV, env)
    if kw.pop("mps", False):
        monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", "/tmp/x")
    else:
        monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    facts = {"device": "cuda", "transport": "cuda_ipc", "replicas": 1, "tp_size": 1, "delays": False,
             "distinct_gpus": False, "one_host": True, **kw}
    assert dx.wanted(**facts) is expect


@pytest.mark.parametrize("kw, match", [
    ({"replicas": 2}, "2 attention replicas"),
    ({"one_host": False}, "roles on several hosts"),
    ({"transport": "tcp"}, "transport tcp"),
    ({"tp_size": 2, "delays": True}, "tensor parallelism .* injected delays"),
])
def test_forcing_it_on_where_it_cannot_run_names_why(monkeypatch, kw, match):
    monkeypatch.setenv(dx.ENV, "on")
    facts = {"device": "cuda", "transport": "cuda_ipc", "replicas": 1, "tp_size": 1, "delays": False,
             "distinct_gpus": False, "one_host": True, **kw}
    with pytest.raises(MscError, match=match):
        dx.wanted(**facts)


def test_a_bad_mode_is_refused(monkeypatch):
    monkeypatch.setenv(dx.ENV, "maybe")
    with pytest.raises(MscError, match="MSC_DEVICE_EXCHANGE=.maybe.: expected one of auto, on, off"):
        dx.mode()


class _HostStub:
    """The replica's host exchange, as far as the device exchange uses it: the per-step control message."""

    def __init__(self):
        self.calls = []

    def device_step(self, epoch, rows, m, eager=False):
        self.calls.append((epoch, rows, m))


def _pair(timeout_s=10.0, nodes=(1, 2)):
    store = dist.HashStore()
    out = {}

    def connect(rank, peers, kind):
        out[rank] = dx.connect(store, rank, peers, kind, DIMS, "cpu", timeout_s)

    threads = [threading.Thread(target=connect, args=(0, list(nodes), "attention"))]
    threads += [threading.Thread(target=connect, args=(n, [0], "expert")) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def _expert_fn(x, ids, w, node):
    """What expert node `node` answers (an arbitrary function of everything it was sent)."""
    return (x.float() * (node + 1) + (ids.float() * w).sum(-1, keepdim=True)).to(x.dtype)


def test_dispatch_and_combine_through_the_areas_sum_every_nodes_answer():
    links = _pair()
    host = _HostStub()
    att = dx.AttentionDeviceExchange(links[0], host, [1, 2])
    steps = 3
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 8, generator=g).to(torch.bfloat16), torch.randint(0, 8, (4, 2), generator=g),
                torch.rand(4, 2, generator=g)) for _ in range(steps * 2)]

    def expert(node):
        side = dx.ExpertDeviceSteps(links[node], program=None)
        side.replica, side.rows = 0, 4
        for s in range(steps):
            links[node].epoch.fill_(s + 1)
            for layer, mb in [(0, 0), (0, 1), (2, 0), (2, 1)]:
                side.mb = mb
                x, ids, w = side.expert_recv(layer, 8, 2, torch.bfloat16)
                side.expert_send(_expert_fn(x, ids, w, node), layer)

    workers = [threading.Thread(target=expert, args=(n,)) for n in (1, 2)]
    for t in workers:
        t.start()
    got = []
    for s in range(steps):
        att.begin(4, 2)
        for layer in (0, 2):
            for mb in (0, 1):
                att.mb = mb
                x, ids, w = batches[s * 2 + mb]
                att.dispatch(x, ids, w, layer, [0, 4, 8])
            for mb in (0, 1):
                att.mb = mb
                got.append((s, mb, att.combine(None, batches[s * 2 + mb][0], layer)))
        att.check()
    for t in workers:
        t.join(30)
    assert host.calls == [(1, 4, 2), (2, 4, 2), (3, 4, 2)]  # one control message a step, fresh epochs
    for s, mb, out in got:
        x, ids, w = batches[s * 2 + mb]
        want = sum(_expert_fn(x, ids, w.float(), n).float() for n in (1, 2))
        torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2)


def test_an_unanswered_wait_expires_into_an_error_naming_layer_and_microbatch():
    links = _pair(timeout_s=0.2, nodes=(1,))
    att = dx.AttentionDeviceExchange(links[0], _HostStub(), [1])
    att.begin(3, 2)
    att.mb = 1
    x = torch.zeros(3, 8, dtype=torch.bfloat16)
    att.dispatch(x, torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2), 2, [0, 8])
    att.combine(None, x, 2)  # nobody answers: returns after the timeout, the error word set
    links[0].flags.timeout_s = 120.0
    t0 = time.monotonic()
    att.combine(None, x, 3)  # a later wait of the same step returns at once instead of waiting out 120 s
    assert time.monotonic() - t0 < 60
    with pytest.raises(PeerError, match="layer 2, micro-batch 1"):
        att.check()
    att.check()  # the error was reported once


def test_a_micro_batch_larger_than_the_areas_is_refused():
    links = _pair(nodes=(1,))
    att = dx.AttentionDeviceExchange(links[0], _HostStub(), [1])
    with pytest.raises(MscError, match="larger than the device exchange"):
        att.begin(DIMS.max_rows + 1, 1)


def test_a_dead_expert_node_fails_the_run_naming_it(tiny_bundle, monkeypatch):
    monkeypatch.setenv(FAULT_ROLE, "expert.1")
    monkeypatch.setenv(FAULT_AFTER, "12")
    with pytest.raises(MscError, match="expert.1"):
        run_bundle(tiny_bundle.path, [[5, 17, 42], [7, 7]], 30, env={dx.ENV: "on"})
