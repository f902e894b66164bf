"""Which GPU each role process takes (msc.runtime.worker.role_device)."""
from __future__ import annotations

import pytest
import torch

from msc.errors import MscError
from msc.runtime.worker import role_device


def test_cpu_roles_stay_on_the_cpu():
    assert role_device("cpu", 5) == "cpu"


@pytest.mark.parametrize("local_rank,gpus,expected", [(0, 4, "cuda:0"), (3, 4, "cuda:3"), (5, 4, "cuda:1"), (2, 1, "cuda:0")])
def test_roles_take_gpus_round_robin(monkeypatch, local_rank, gpus, expected):
    chosen = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    assert role_device("cuda", 99) == expected
    assert chosen == [int(expected.split(":")[1])]  # the process's current device follows (cuda_ipc, NCCL use it)


def test_cuda_bundle_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(MscError, match="no CUDA device"):
        role_device("cuda", 0)
