"""Reliability of local deployments (issue 25): dead and stopped roles are named and the server recovers;
a launcher killed with SIGTERM or SIGKILL leaves no process, folder or shared-memory file behind; a
module in the folder a run starts from cannot shadow a role process's imports."""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from msc.engine.request import SamplingParams
from msc.errors import MscError
from msc.runtime.serving import ServingEngine
from msc.server import ServerThread, create_app
from msc.verify import reference_generate

LONG = SamplingParams(max_tokens=3000, ignore_eos=True)


def wait_until(cond, timeout_s: float, what: str):
    """Poll cond() until it returns something truthy (returned), failing after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout_s} s")
        time.sleep(0.05)


def role_pid(eng: ServingEngine, name: str) -> int:
    return next(p.pid for r, p in eng._procs if r["name"] == name)


def worker_pids(marker: str) -> list[int]:
    """Role processes (msc.runtime.worker) whose command line names `marker` (a bundle path)."""
    pids = []
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            text = Path(cmdline).read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "msc.runtime.worker" in text and marker in text:
            pids.append(int(cmdline.split("/")[2]))
    return pids


def listening_addresses(pid: int) -> list[str]:
    """The local addresses (hex, as /proc/net/tcp{,6} write them) of the TCP sockets process pid listens on."""
    inodes = set()
    for fd in glob.glob(f"/proc/{pid}/fd/*"):
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # state LISTEN
                out.append(f[1].split(":")[0])
    return out


def shm_files() -> set[str]:
    return set(glob.glob("/dev/shm/msc-*"))


def test_after_kill_9_of_an_expert_the_server_serves_again_within_30_s(tiny_bundle, tiny_hf):
    eng = ServingEngine(tiny_bundle.path).start(timeout_s=180)
    try:
        req = eng.submit([5, 17, 42], params=LONG)
        next(req.stream(timeout=60))  # decoding
        t0 = time.monotonic()
        os.kill(role_pid(eng, "expert.1"), signal.SIGKILL)
        with pytest.raises(MscError, match=r"role expert[.]1 \(rank 2\) was killed by SIGKILL"):
            req.result(timeout=30)
        wait_until(lambda: eng.health()["status"] == "ok" and eng.health()["restarts"] == 1, 30, "serving again")
        assert eng.generate([[7, 7]], 3) == [reference_generate(tiny_hf, [7, 7], 3)]
        assert time.monotonic() - t0 < 30
        h = eng.health()
        assert "expert.1" in h["last_error"] and h["unfinished"] == 0
    finally:
        eng.close(grace_s=10)


def test_a_stopped_expert_fails_requests_and_health_within_10_s_naming_it(tiny_bundle):
    eng = ServingEngine(tiny_bundle.path, max_restarts=0).start(timeout_s=180)
    stopped = None
    try:
        with ServerThread(create_app(eng)) as url:
            assert httpx.get(f"{url}/health").status_code == 200
            req = eng.submit([5, 17, 42], params=LONG)
            next(req.stream(timeout=60))
            stopped = role_pid(eng, "expert.0")
            t0 = time.monotonic()
            os.kill(stopped, signal.SIGSTOP)
            with pytest.raises(MscError, match=r"role expert[.]0 \(rank 1\) has not answered for .* stopped or hung"):
                req.result(timeout=30)
            r = httpx.get(f"{url}/health")
            assert time.monotonic() - t0 < 10
            assert r.status_code == 503 and "expert.0" in r.json()["error"]
    finally:
        eng.close(grace_s=5)
        if stopped is not None:
            try:
                os.kill(stopped, signal.SIGKILL)  # close() killed it already; this only guards a failed test
            except ProcessLookupError:
                pass


@pytest.mark.parametrize("command", ["run", "serve"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_killed_launcher_leaves_no_process_folder_or_shared_memory(tiny_bundle, tmp_path, sig, command):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.path, bundle)  # its own path: the role processes are found by it
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    shm_before = shm_files()
    args = (["run", str(bundle), "--input-ids", "5,6,7", "--max-new-tokens", "4000", "--delay-ms", "attention=5"]
            if command == "run" else ["serve", str(bundle), "--port", "0", "--no-access-log"])
    run = subprocess.Popen([sys.executable, "-P", "-m", "msc.cli", *args],
                           env={**os.environ, "TMPDIR": str(tmp)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # every role is up once it has written its first heartbeat
        wait_until(lambda: len(glob.glob(str(tmp / "msc-*" / "heartbeat.*"))) == 3, 120, "3 roles started")
        pids = worker_pids(str(bundle))
        assert len(pids) == 3
        # the rendezvous store (hosted by rank 0) and anything else the roles listen on: loopback only
        listening = wait_until(lambda: [a for pid in pids for a in listening_addresses(pid)], 60, "rank 0 listening")
        assert set(listening) <= {"0100007F"}, listening
        run.send_signal(sig)
        run.wait(timeout=30)
        wait_until(lambda: not worker_pids(str(bundle)), 15, "every role process gone")
        wait_until(lambda: not any(tmp.iterdir()), 15, "the run's temporary folder removed")
        wait_until(lambda: not (shm_files() - shm_before), 15, "the run's /dev/shm files removed")
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(timeout=10)
        for pid in worker_pids(str(bundle)):
            os.kill(pid, signal.SIGKILL)


def test_a_module_in_the_folder_a_run_starts_from_does_not_run(tiny_bundle, tiny_hf, tmp_path):
    """`cd BUNDLE && msc run .`: a numpy.py there would shadow numpy in every role process started with
    plain `python -m`; role processes start in safe-path mode (-P) instead."""
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.path, bundle)
    marker = tmp_path / "shadow-ran"
    (bundle / "numpy.py").write_text(f"open({str(marker)!r}, 'a').write('ran')\nraise ImportError('shadowed')\n")
    run = subprocess.run([sys.executable, "-P", "-m", "msc.cli", "run", ".", "--input-ids", "5,17,42",
                          "--max-new-tokens", "4", "--json"], cwd=bundle, capture_output=True, text=True, timeout=300)
    assert not marker.exists()
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["outputs"] == [reference_generate(tiny_hf, [5, 17, 42], 4)]
    torchrun_script = (bundle / "launch" / "torchrun_attention.0.sh").read_text()
    assert "PYTHONSAFEPATH=1 torchrun" in torchrun_script
