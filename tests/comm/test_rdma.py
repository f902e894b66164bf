"""The RDMA transport across real processes: the same checks test_transports.py runs for shm and tcp.

They need pyverbs (rdma-core's python3-pyverbs package) and an RDMA device with an active port; without
them they are skipped. The one test that needs neither checks the error a host without pyverbs gets.
"""
from __future__ import annotations

import sys

import pytest

from msc.errors import MscError
from tests.comm.harness import run_ranks
from tests.comm.test_transports import SHAPES, SIZES


def _rdma_missing() -> str | None:
    """Why the hardware tests cannot run here, or None when they can."""
    try:
        import pyverbs.device as d
    except ImportError as err:
        return f"pyverbs is not installed ({err}); it ships with rdma-core as python3-pyverbs"
    try:
        devices = d.get_device_list()
    except Exception as err:  # pyverbs raises its own error types
        return f"cannot list RDMA devices: {err}"
    return None if devices else "no RDMA device on this host"


# NOTE: a skip marker rather than a module-level importorskip, so that the no-pyverbs test below still runs.
_MISSING = _rdma_missing()
needs_rdma = pytest.mark.skipif(_MISSING is not None, reason=f"the rdma transport needs pyverbs and an RDMA device: {_MISSING}")


def test_connect_without_pyverbs_is_a_clear_error(monkeypatch):
    from msc.backends.comm import m2n

    # Hide pyverbs whether or not it is installed: a None entry makes `import pyverbs...` raise ImportError.
    for name in [m for m in sys.modules if m == "pyverbs" or m.startswith("pyverbs.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "pyverbs", None)
    with pytest.raises(MscError, match="pyverbs"):
        m2n.connect("rdma", 0, [1], store=None)


@needs_rdma
def test_m_to_n_exchange_is_exact_for_every_shape_and_size():
    results = run_ranks("tests.comm.scenarios:exchange", 6, {"transport": "rdma", "shapes": SHAPES, "sizes": SIZES},
                        timeout_s=240)
    expected = [sum(n * len(SIZES) if r < m else (m * len(SIZES) if r < m + n else 0) for m, n in SHAPES) for r in range(6)]
    assert [res["checked"] for res in results] == expected


@needs_rdma
def test_dead_peer_is_an_error_naming_it_within_the_timeout():
    res = run_ranks("tests.comm.scenarios:dies_midway", 2, {"transport": "rdma", "timeout_s": 20.0},
                    timeout_s=90, expect_fail={1})
    assert res[1]["code"] == 3
    err = res[0]["error"]
    assert err is not None and "1" in err and "died or closed" in err
    assert res[0]["seconds"] < 5  # the liveness probe fails after the NIC's retries (well under a second)


@needs_rdma
def test_silent_peer_times_out_with_a_clear_error():
    res = run_ranks("tests.comm.scenarios:silent_peer", 2, {"transport": "rdma", "timeout_s": 20.0, "wait_s": 1.0},
                    timeout_s=90)
    assert res[0]["error"] is not None and "waited 1.0 s on peer(s) [1]" in res[0]["error"]
    assert 1.0 <= res[0]["seconds"] < 4.0


@needs_rdma
def test_corrupted_header_is_a_clear_error():
    res = run_ranks("tests.comm.scenarios:corrupt_header", 2, {"transport": "rdma", "timeout_s": 20.0}, timeout_s=90)
    assert res[1]["error"] is not None and "corrupted header from rank 0" in res[1]["error"]
