"""Per-role summary of a bundle (what `msc inspect` prints)."""
from __future__ import annotations

import json
import math
from collections import Counter

from msc.bundle import Bundle

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int64": 8}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            break
        n /= 1024
    return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"


def role_table(bundle_dir) -> tuple[list[dict], dict]:
    b = Bundle.open(bundle_dir)
    rows = []
    for role in b.roles:
        prog = json.loads((b.path / "programs" / f"{role['program']}.json").read_text())
        wmap = json.loads((b.path / "weights" / f"{role['program']}.json").read_text())
        ops = Counter(
            n["target"].split(".")[3] for n in prog["nodes"] if n["op"] == "call_function" and n["target"].startswith("torch.ops.msc.")
        )
        numels = [(math.prod(e["shape"]), e["dtype"]) for e in wmap.values()]
        params = sum(n for n, _ in numels)
        nbytes = sum(n * _BYTES[dt] for n, dt in numels)
        stages = {n["meta"]["msc"]["stage"] for n in prog["nodes"] if "stage" in n.get("meta", {}).get("msc", {})}
        rows.append({
            "role": role["name"], "rank": role["rank"], "program": role["program"], "nodes": len(prog["nodes"]),
            "stages": len(stages),
            "msc_ops": ", ".join(f"{k}×{v}" for k, v in sorted(ops.items())), "parameters": params, "bytes": nbytes,
            "bytes_h": human_bytes(nbytes),
        })
    return rows, b.manifest
