"""CUDA MPS for role processes that share one GPU: the attention and expert processes run side by side on the
GPU's SMs (each limited to a share of them) instead of time-slicing it.

`MpsDaemon` starts NVIDIA's control daemon (`nvidia-cuda-mps-control -d`) with its pipe and log folders in
the run's work folder, gives each role the environment that points it there and its SM share
(CUDA_MPS_ACTIVE_THREAD_PERCENTAGE), and stops the daemon (`quit` on its control pipe) when the run ends.
`shares_from_profile` picks the shares from measured times (`msc profile`): each side gets the GPU in
proportion to its per-layer time at the run's batch, so that neither side waits on the other.

Ran on an H100 and an H200 (session 12: tests/engine/test_engine_gpu.py, benchmarks/engine_step.py), where
it is what lets the device exchange (msc.runtime.device_exchange) hand off between two processes of one GPU
without time-slicing; the daemon handling is also tested with a stand-in for the control binary.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from msc.errors import MscError

CONTROL = "nvidia-cuda-mps-control"


def parse_shares(text: str) -> dict[str, int]:
    """'40,60' or 'attention=40,expert=60' -> {"attention": 40, "expert": 60} (percent of the SMs)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if len(parts) != 2:
        raise MscError(f"--mps takes two SM shares, attention and expert (e.g. 40,60), got {text!r}")
    out = {}
    for side, p in zip(("attention", "expert"), parts):
        key, _, val = p.rpartition("=")
        key = key or side
        if key not in ("attention", "expert") or not val.isdigit() or not 1 <= int(val) <= 100:
            raise MscError(f"--mps: {p!r} is not a share from 1 to 100 percent (attention=P,expert=P)")
        out[key] = int(val)
    if set(out) != {"attention", "expert"}:
        raise MscError(f"--mps names each side once, got {text!r}")
    return out


def shares_from_profile(profile, batch: int, top_k: int, context: float) -> dict[str, int]:
    """SM shares in proportion to the attention and expert times per layer at `batch` sequences (decode)."""
    a = profile.attention
    t_a = a.k1 * batch + a.k2 + a.k1_ctx * batch * (context - profile.context)
    t_e = profile.expert.k3 * batch * top_k + profile.expert.k4
    att = round(100 * t_a / (t_a + t_e) / 5) * 5  # 5 % steps
    att = min(90, max(10, att))
    return {"attention": att, "expert": 100 - att}


class MpsDaemon:
    """The MPS control daemon of one run; `env(share)` is a role's environment under it."""

    def __init__(self, workdir: Path):
        if shutil.which(CONTROL) is None:
            raise MscError(f"--mps needs NVIDIA's {CONTROL} on the PATH (it ships with the CUDA driver); none found")
        self.pipe, self.log = workdir / "mps_pipe", workdir / "mps_log"
        self.pipe.mkdir(parents=True, exist_ok=True)
        self.log.mkdir(parents=True, exist_ok=True)
        self.base = {"CUDA_MPS_PIPE_DIRECTORY": str(self.pipe), "CUDA_MPS_LOG_DIRECTORY": str(self.log)}
        self.running = False

    def start(self) -> "MpsDaemon":
        r = subprocess.run([CONTROL, "-d"], env={**os.environ, **self.base}, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise MscError(f"{CONTROL} -d failed ({r.returncode}): {(r.stderr or r.stdout).strip()[:300]}")
        self.running = True
        return self

    def env(self, share: int) -> dict[str, str]:
        return {**self.base, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(share)}

    def stop(self) -> None:
        if self.running:
            subprocess.run([CONTROL], input="quit\n", env={**os.environ, **self.base}, capture_output=True, text=True,
                           timeout=30)
            self.running = False
