"""The cuda_ipc transport across real processes: the checks test_transports.py runs for the CPU transports.

The GPU tests carry the `gpu` marker, which pyproject's addopts deselect by default: run them with
`python -m pytest -q -m gpu tests/comm/test_cuda_ipc.py`. Without CUDA they are skipped with the reason.
Several processes share one GPU here (each opens its own context); the cross-GPU test needs two GPUs.
The one test that needs no GPU checks the error a host without CUDA gets.
"""
from __future__ import annotations

import pytest
import torch

from msc.backends.comm import m2n
from msc.errors import MscError
from tests.comm.harness import run_ranks
from tests.comm.test_transports import SIZES

SHAPES = [(m, n) for m in (1, 2) for n in (1, 2)]
WORLD = 4
ARGS = {"transport": "cuda_ipc", "device": "cuda", "shapes": SHAPES, "sizes": SIZES, "buffer_bytes": 1 << 20}
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                               reason="the cuda_ipc transport needs a CUDA GPU; torch.cuda.is_available() is False")
needs_two_gpus = pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                                    reason="the cross-GPU exchange needs two CUDA GPUs")


def _expected() -> list[int]:
    # Each sender checks one reply per (receiver, size); each receiver checks one message per (sender, size).
    return [sum(n * len(SIZES) if r < m else (m * len(SIZES) if r < m + n else 0) for m, n in SHAPES) for r in range(WORLD)]


def test_connect_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU host
    with pytest.raises(MscError, match=r"cuda_ipc needs a CUDA GPU.*torch\.cuda\.is_available\(\) is False"):
        m2n.connect("cuda_ipc", 0, [1], store=None, device="cuda")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("borrow", [False, True])
def test_m_to_n_exchange_on_one_gpu_is_exact_for_every_shape_and_size(borrow):
    # 3 MB messages stream through the 1 MB rings; tags go out in reverse, so most arrive before asked for.
    # borrow: messages that arrive whole are delivered as views of the ring until released.
    results = run_ranks("tests.comm.scenarios:exchange", WORLD, {**ARGS, "borrow": borrow}, timeout_s=300)
    assert [res["checked"] for res in results] == _expected()


@pytest.mark.gpu
@needs_gpu
@needs_two_gpus
def test_m_to_n_exchange_across_gpus_is_exact():
    results = run_ranks("tests.comm.cuda_scenarios:exchange_spread", WORLD, ARGS, timeout_s=300)
    assert [res["checked"] for res in results] == _expected()
    assert len({res["gpu"] for res in results}) >= 2


@pytest.mark.gpu
@needs_gpu
def test_dead_peer_is_an_error_naming_it_within_the_timeout():
    res = run_ranks("tests.comm.cuda_scenarios:dies_midway", 2, {"timeout_s": 20.0}, timeout_s=120, expect_fail={1})
    assert res[1]["code"] == 3, res[1]["log"][-2000:]
    assert res[0]["echo"]
    assert res[0]["cpu_error"] is not None and "CUDA tensors" in res[0]["cpu_error"]
    err = res[0]["error"]
    assert err is not None and "1" in err and "died or closed" in err
    assert res[0]["seconds"] < 5  # the shm control path watches the peer's pid: no need to time out


@pytest.mark.gpu
@needs_gpu
def test_corrupted_header_is_a_clear_error():
    res = run_ranks("tests.comm.cuda_scenarios:corrupt_header", 2, {"timeout_s": 20.0}, timeout_s=120)
    assert res[1]["error"] is not None and "corrupted header from rank 0" in res[1]["error"]


@pytest.mark.gpu
@needs_gpu
def test_borrowed_messages_are_views_of_the_ring_and_come_back_on_release():
    res = run_ranks("tests.comm.cuda_scenarios:borrow_and_release", 2, {"timeout_s": 30.0}, timeout_s=180)
    assert res[1]["ok"]
    assert res[1]["lent1"] == 64  # released before the next came: every one of 4 MB through a 1 MB ring lent
    assert res[1]["lent2"] == (1 << 20) // 2 // (64 << 10)  # held: lent while within half the ring (8), then copied
