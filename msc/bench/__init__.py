"""Benchmarks that ship with msc (`msc bench ...`): they print tables and write JSON results."""
from __future__ import annotations

import os
import platform
from importlib import metadata


def machine_info(packages: tuple[str, ...] = ("torch", "transformers")) -> dict:
    """What a benchmark's JSON records about where it ran: CPU, usable cores, OS, Python and the versions
    of `packages` (read from their metadata, so nothing heavy is imported for it)."""
    versions = {}
    for pkg in packages:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": platform.processor() or platform.machine(), "cores": cores, "platform": platform.platform(),
            "python": platform.python_version(), **versions}
