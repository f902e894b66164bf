"""`msc bench m2n` (msc/bench/m2n.py): input checks, the all-to-all split contract, a real CPU run, and the
GPU run (cuda_ipc against NCCL) where a CUDA device exists."""
from __future__ import annotations

import pytest
import torch

from msc.bench import m2n
from msc.errors import MscError


def test_bad_device_and_transport_are_clear_errors():
    with pytest.raises(MscError, match="device must be cpu or cuda"):
        m2n.run(["shm"], [2048], [1], device="tpu")
    with pytest.raises(MscError, match="runs transports"):
        m2n.run(["cuda_ipc"], [2048], [1], device="cpu")
    with pytest.raises(MscError, match="runs transports"):
        m2n.run(["shm"], [2048], [1], device="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(MscError, match="no CUDA device"):
        m2n.run(["cuda_ipc"], [2048], [1], device="cuda")


@pytest.mark.parametrize("mn", [1, 2, 3])
def test_all_to_all_splits_pair_up_across_ranks(mn):
    """What rank i sends to rank j in each all-to-all is what rank j expects from rank i, the buffers hold
    exactly the splits, and only attention -> expert (dispatch) and expert -> attention (combine) move."""
    size, world = 4096, 2 * mn
    bufs = [m2n._all_to_all_buffers(r, mn, size, "cpu") for r in range(world)]
    for i in range(world):
        send, recv, (d_in, d_out), (c_in, c_out) = bufs[i]
        assert send.numel() == sum(d_in) == sum(c_out) and recv.numel() == sum(d_out) == sum(c_in)
        for j in range(world):
            assert d_in[j] == bufs[j][2][1][i]  # dispatch: i's input split to j = j's output split from i
            assert c_in[j] == bufs[j][3][1][i]
            expected = size if (i < mn) != (j < mn) else 0
            assert d_in[j] == (expected if i < mn else 0) and c_in[j] == (expected if i >= mn else 0)


def test_cpu_run_measures_shm_against_gloo():
    res = m2n.run(["shm", "torch_dist"], [2048, 64 << 10], [1], scale=0.1, timeout_s=300)
    rows = {(r["transport"], r["size"]): r for r in res["rows"]}
    assert set(rows) == {(t, s) for t in ("shm", "torch_dist") for s in (2048, 64 << 10)}
    for r in rows.values():
        assert 0 < r["p50_us"] <= r["p99_us"] and r["samples"] >= 10
        assert r["gbps"] == pytest.approx(2 * r["size"] / (r["p50_us"] * 1e-6) / 1e9)
    assert {q["transport"] for q in m2n.ratios(res)} == {"shm"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_run_cuda_ipc_and_nccl_where_the_gpus_allow():
    res = m2n.run(None, [2048, 1 << 20], [1], scale=0.1, timeout_s=300, device="cuda")
    got = {r["transport"] for r in res["rows"]}
    assert "cuda_ipc" in got
    if torch.cuda.device_count() >= 2:
        assert {"torch_dist", "nccl_all_to_all"} <= got
    else:  # NCCL cannot put two ranks on one GPU: said, not silently dropped
        assert {s["transport"] for s in res["skipped"]} == {"torch_dist", "nccl_all_to_all"}
    assert all(0 < r["p50_us"] <= r["p99_us"] for r in res["rows"])
