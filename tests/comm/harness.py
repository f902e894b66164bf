"""Run a function on W separate processes that rendezvous through a TCPStore hosted by the test.

    results = run_ranks("tests.comm.scenarios:exchange", world=4, args={...}, timeout_s=120)

Each rank is `python -m tests.comm.rank_main`, which connects to the store, calls
`fn(rank, world, store, args)` and writes its JSON-able return value. The harness watches the
processes with a deadline: a rank that fails or hangs fails the test with that rank's output.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]


class RankFailure(AssertionError):
    def __init__(self, rank: int, code, log: str):
        super().__init__(f"rank {rank} exited with {code}:\n{log[-3000:]}")
        self.rank, self.code, self.log = rank, code, log


def run_ranks(target: str, world: int, args: dict | None = None, *, timeout_s: float = 120.0,
              env: dict[str, str] | None = None, expect_fail: set[int] | None = None,
              netns: list[str] | None = None) -> list:
    """Results of `target` on each rank; ranks in `expect_fail` may fail (their result is their log).

    With `netns`, rank r runs inside network namespace netns[r] (a separate network stack: another
    "host"); the ranks then rendezvous through a FileStore, since no TCP port is reachable from all.
    """
    expect_fail = expect_fail or set()
    with tempfile.TemporaryDirectory(prefix="msc-ranks-") as tmp:
        if netns:
            store_arg = f"file:{tmp}/store"
        else:
            store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
            store_arg = f"tcp:{store.port}"
        procs = []
        for r in range(world):
            cmd = [sys.executable, "-m", "tests.comm.rank_main", "--target", target, "--rank", str(r), "--world", str(world),
                   "--store", store_arg, "--args", json.dumps(args or {}), "--out", f"{tmp}/result.{r}.json"]
            if netns:
                cmd = ["ip", "netns", "exec", netns[r], *cmd]
            log = open(f"{tmp}/log.{r}", "w")
            penv = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=penv, stdout=log, stderr=subprocess.STDOUT))
            log.close()
        deadline = time.monotonic() + timeout_s
        try:
            for r, p in enumerate(procs):
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    raise RankFailure(r, "no exit before the harness deadline (hang)", Path(f"{tmp}/log.{r}").read_text()) from None
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
        results = []
        for r, p in enumerate(procs):
            log = Path(f"{tmp}/log.{r}").read_text()
            if r in expect_fail:
                results.append({"code": p.returncode, "log": log})
            elif p.returncode != 0:
                raise RankFailure(r, p.returncode, log)
            else:
                results.append(json.loads(Path(f"{tmp}/result.{r}.json").read_text()))
        return results
