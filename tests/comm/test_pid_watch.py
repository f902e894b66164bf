"""shm's PidWatch (the liveness check cuda_ipc makes before every write into a peer's memory) agrees with a
fresh read of /proc: alive while the process runs, dead once it has exited (zombie) and once it is reaped."""
from __future__ import annotations

import subprocess
import sys
import time

from msc.backends.comm.shm import PidWatch


def process_alive(pid: int) -> bool:
    """An independent reading: open /proc afresh and look at the state letter after the command name."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] not in (b"Z", b"X")


def test_pid_watch_follows_a_process_through_exit_and_reaping():
    p = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    watch = PidWatch(p.pid)
    try:
        assert watch.alive() and process_alive(p.pid)
        p.stdin.close()  # the child reads EOF and exits; until wait() it is a zombie
        deadline = time.monotonic() + 10.0
        while watch.alive():  # polls the exit; bounded, so a stuck child fails the test instead of hanging it
            assert time.monotonic() < deadline, "the child did not exit within 10 s"
        assert not process_alive(p.pid)
        p.wait(timeout=10)
        assert not watch.alive()  # reaped: the kept file no longer reads
    finally:
        if p.poll() is None:
            p.kill()
        watch.close()
    assert not watch.alive()  # closed


def test_pid_watch_of_a_missing_process_is_dead():
    assert not PidWatch(2**22 + 12345).alive()  # above the default pid_max: no such process
