"""msc.runtime.mps: SM shares (parsed, and from a measured profile) and the control daemon's life cycle,
driven here through a stand-in for `nvidia-cuda-mps-control` that records how it was called (the real one
needs an NVIDIA driver)."""
from __future__ import annotations

import json
import os
import stat

import pytest

from msc.errors import MscError
from msc.planner.perf import ExpertFit, LinearFit, Profile
from msc.runtime.launcher import run_bundle
from msc.runtime.mps import MpsDaemon, parse_shares, shares_from_profile


def test_parse_shares():
    assert parse_shares("40,60") == {"attention": 40, "expert": 60}
    assert parse_shares("expert=70,attention=30") == {"attention": 30, "expert": 70}
    for bad in ("40", "0,60", "40,101", "gpu=40,expert=60", "attention=40,attention=60"):
        with pytest.raises(MscError, match="--mps"):
            parse_shares(bad)


def test_shares_follow_the_measured_times():
    # per layer at batch 64: attention 1e-5 * 64 + 1e-4 = 0.74 ms; experts 2e-6 * 128 + 1e-3 = 1.256 ms
    p = Profile(gpu="H100", context=571.0, attention=LinearFit(k1=1e-5, k2=1e-4), expert=ExpertFit(k3=2e-6, k4=1e-3))
    s = shares_from_profile(p, batch=64, top_k=2, context=571.0)
    assert s == {"attention": 35, "expert": 65}  # 0.74 / 1.996 = 37 % -> 35 in 5 % steps
    lopsided = Profile(gpu="H100", context=571.0, attention=LinearFit(k1=0, k2=1e-6), expert=ExpertFit(k3=0, k4=1.0))
    assert shares_from_profile(lopsided, 64, 2, 571.0) == {"attention": 10, "expert": 90}  # never below 10 %


@pytest.fixture
def fake_control(tmp_path, monkeypatch):
    """A stand-in `nvidia-cuda-mps-control` on the PATH: appends its arguments, stdin and MPS env to a log."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "calls.jsonl"
    script = bindir / "nvidia-cuda-mps-control"
    script.write_text(f"""#!/usr/bin/env python3
import json, os, sys
stdin = "" if sys.stdin.isatty() or "-d" in sys.argv else sys.stdin.read()
with open({str(log)!r}, "a") as f:
    f.write(json.dumps({{"args": sys.argv[1:], "stdin": stdin,
                        "pipe": os.environ.get("CUDA_MPS_PIPE_DIRECTORY")}}) + "\\n")
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_daemon_starts_gives_role_env_and_quits(tmp_path, fake_control):
    d = MpsDaemon(tmp_path / "run").start()
    env = d.env(40)
    assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "40"
    assert env["CUDA_MPS_PIPE_DIRECTORY"] == str(tmp_path / "run" / "mps_pipe") and (tmp_path / "run" / "mps_pipe").is_dir()
    d.stop()
    d.stop()  # once only
    calls = [json.loads(line) for line in fake_control.read_text().splitlines()]
    assert [c["args"] for c in calls] == [["-d"], []]
    assert calls[1]["stdin"] == "quit\n" and all(c["pipe"] == env["CUDA_MPS_PIPE_DIRECTORY"] for c in calls)


def test_no_control_binary_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MscError, match="nvidia-cuda-mps-control on the PATH"):
        MpsDaemon(tmp_path / "run")


def test_mps_on_a_cpu_run_is_refused(tiny_bundle, fake_control):
    with pytest.raises(MscError, match="--device cuda"):
        run_bundle(tiny_bundle.path, [[1, 2]], 2, mps={"attention": 40, "expert": 60})
    assert not fake_control.exists()  # nothing was started


def test_serving_under_mps_on_a_cpu_bundle_is_refused(tiny_bundle, fake_control):
    from msc.runtime.serving import ServingEngine

    with pytest.raises(MscError, match="--device cuda"):
        ServingEngine(tiny_bundle.path, mps={"attention": 100, "expert": 100})
    assert not fake_control.exists()


def test_msc_serve_colocated_refuses_mps(tiny_bundle):
    from typer.testing import CliRunner

    from msc.cli import app

    r = CliRunner().invoke(app, ["serve", str(tiny_bundle.path), "--colocated", "--mps", "50,50"])
    assert r.exit_code != 0 and "--mps" in r.output and "role processes" in r.output
