"""How long shm polls before sleeping: short where roles outnumber cores, long where cores are plenty,
and MSC_SHM_SPIN_US wins over both."""
from __future__ import annotations

import os

from msc.backends.comm import shm


def test_spin_follows_the_usable_cores_and_the_environment(monkeypatch):
    monkeypatch.delenv("MSC_SHM_SPIN_US", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)))
    assert shm._default_spin_s() == 300e-6
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert shm._default_spin_s() == 5e-3
    monkeypatch.setenv("MSC_SHM_SPIN_US", "120")
    assert abs(shm._default_spin_s() - 120e-6) < 1e-12
