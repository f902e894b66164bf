"""Process life cycle of a local deployment: nothing outlives its launcher, silent roles are noticed.

A launcher (`msc run`, `msc serve`) starts the role processes with three environment variables:

- MSC_PARENT_PID: the launcher's pid. Each role watches it (`watch_parent`); once the launcher is gone
  (killed with SIGKILL, say, so that none of its own clean-up ran) the role removes the run's folder and
  shared-memory files and exits. NOTE: a polling thread rather than prctl(PR_SET_PDEATHSIG): the death
  signal fires when the *thread* that started the child ends, and servers start roles from worker threads.
- MSC_RUN_DIR: the run's temporary folder (logs, results, heartbeats), removed by whoever ends last.
- MSC_RUN_TAG: a name shared by every /dev/shm file of the run (backends/comm/shm.py names its mailboxes
  `msc-TAG-...`), so that the launcher (or an orphaned role) can remove what a role killed in the middle of
  the rendezvous left behind (`sweep_shm`).

Heartbeats: each role touches RUN_DIR/heartbeat.RANK every HEARTBEAT_EVERY_S from a thread of its own
(`Heartbeat`), and removes the file once its work is over; the launcher or server reads their ages
(`silent_roles`). A stopped (SIGSTOP) or wedged
process stops touching its file and is named within the bound (runtime.heartbeat_timeout_s, default 5 s),
where waiting on it through the transport would take the full runtime.timeout_s.
"""
from __future__ import annotations

import glob
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

PARENT_ENV = "MSC_PARENT_PID"
RUN_DIR_ENV = "MSC_RUN_DIR"
RUN_TAG_ENV = "MSC_RUN_TAG"
SHM_DIR = "/dev/shm"
HEARTBEAT_EVERY_S = 0.5
DEFAULT_HEARTBEAT_TIMEOUT_S = 5.0
PARENT_ANY = "any"


def new_run_tag() -> str:
    return secrets.token_hex(5)


def role_env(workdir: Path, tag: str) -> dict[str, str]:
    """The variables a launcher gives its role processes (see the module docstring)."""
    return {PARENT_ENV: str(os.getpid()), RUN_DIR_ENV: str(workdir), RUN_TAG_ENV: tag}


def shm_name_prefix() -> str:
    """The prefix of this process's /dev/shm files: `msc-TAG-` inside a launched run, `msc-` elsewhere."""
    tag = os.environ.get(RUN_TAG_ENV, "")
    return f"msc-{tag}-" if tag else "msc-"


def sweep_shm(tag: str) -> list[str]:
    """Unlink every /dev/shm file of run `tag` (mailboxes a dead role never got to unlink); their paths."""
    if not tag:
        return []
    gone = []
    for path in glob.glob(f"{SHM_DIR}/msc-{tag}-*"):
        try:
            os.unlink(path)
            gone.append(path)
        except FileNotFoundError:
            pass
    return gone


def cleanup_run(workdir: str | Path | None, tag: str | None) -> None:
    """Remove a run's folder and shared-memory files (either may be gone already)."""
    if workdir:
        for _ in range(5):  # NOTE: several processes may remove it at once; a lost race leaves files to retry
            shutil.rmtree(workdir, ignore_errors=True)
            if not os.path.exists(workdir):
                break
    if tag:
        sweep_shm(tag)


def watch_parent(poll_s: float = 0.2) -> threading.Thread | None:
    """In a role process: a daemon thread that ends this process (after removing the run's folder and shm
    files) as soon as the launcher named by MSC_PARENT_PID is gone. None when not started by a launcher."""
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return None
    # "any": the process that started this one, whoever it is (torchrun's agent under msc launch)
    parent_pid = os.getppid() if parent == PARENT_ANY else int(parent)

    def orphaned() -> bool:
        # NOTE: an orphan is re-parented (to init or a subreaper), so getppid changes; a pid that is
        # reused by then is not a concern because the getppid check comes first.
        return os.getppid() != parent_pid

    def loop() -> None:
        while not orphaned():
            time.sleep(poll_s)
        print(f"msc role pid {os.getpid()}: the launcher (pid {parent_pid}) is gone; stopping", file=sys.stderr, flush=True)
        cleanup_run(os.environ.get(RUN_DIR_ENV), os.environ.get(RUN_TAG_ENV))
        os._exit(70)

    if orphaned():  # the launcher died before this thread started
        loop()
    t = threading.Thread(target=loop, name="msc-parent-watch", daemon=True)
    t.start()
    return t


class Heartbeat:
    """In a role process: touch RUN_DIR/heartbeat.RANK every `every_s` from a daemon thread."""

    def __init__(self, rank: int, every_s: float = HEARTBEAT_EVERY_S, run_dir: str | None = None):
        run_dir = run_dir or os.environ.get(RUN_DIR_ENV)
        self.path = Path(run_dir) / f"heartbeat.{rank}" if run_dir else None
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "Heartbeat":
        if self.path is None:
            return self
        self._beat()
        self._thread = threading.Thread(target=self._loop, name="msc-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        try:
            if self._thread is None:
                self.path.touch()
            else:  # NOTE: never re-create the file: the run folder may be in the middle of being removed
                os.utime(self.path)
        except OSError:
            pass

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self._beat()

    def stop(self) -> None:
        """The role's work is over: stop beating and remove the file. NOTE: a role on its way out (closing
        sockets, process groups, CUDA) is not hung, however long that takes; its exit is watched instead."""
        self._stop.set()
        if self.path is not None:
            try:
                self.path.unlink()
            except OSError:
                pass


def silent_roles(workdir: Path, roles: list[dict], bound_s: float) -> list[tuple[dict, float]]:
    """(role, seconds since its last heartbeat) for every role silent for more than bound_s. A role whose
    heartbeat file does not exist yet is still starting and is not counted (its start has its own bound)."""
    now = time.time()
    out = []
    for r in roles:
        try:
            age = now - (workdir / f"heartbeat.{r['rank']}").stat().st_mtime
        except FileNotFoundError:
            continue
        if age > bound_s:
            out.append((r, age))
    return out


def silence_message(workdir: Path, roles: list[dict], bound_s: float, where: str = "") -> str | None:
    """The error naming the first of `roles` silent for more than bound_s (None if none is); `where` names
    the place, e.g. " on node 1"."""
    silent = silent_roles(workdir, roles, bound_s)
    if not silent:
        return None
    r, age = silent[0]
    return (f"role {r['name']} (rank {r['rank']}){where} has not answered for {age:.1f} s (more than "
            f"runtime.heartbeat_timeout_s = {bound_s:g}): it is stopped or hung")


def describe_exit(rc: int) -> str:
    """'exited with code 3' or 'was killed by SIGKILL' (with a hint where the signal has a usual cause)."""
    if rc >= 0:
        return f"exited with code {rc}"
    try:
        name = signal.Signals(-rc).name
    except ValueError:
        name = f"signal {-rc}"
    hint = {"SIGKILL": " (by someone, or by the kernel's out-of-memory killer: see dmesg)",
            "SIGSEGV": " (a crash in native code)", "SIGBUS": " (a crash in native code, or /dev/shm is full)"}
    return f"was killed by {name}{hint.get(name, '')}"


def exit_on_sigterm() -> None:
    """In a launcher's main thread: SIGTERM (and SIGHUP) raise SystemExit, so that `finally` blocks and
    context managers stop the roles and remove temporary folders, as Ctrl-C does."""
    def handler(signum, _frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, handler)
