"""Per-role summary of a bundle (what `msc inspect` prints)."""
from __future__ import annotations

import json
from collections import Counter

from msc.bundle import Bundle

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int64": 8}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def role_table(bundle_dir) -> tuple[list[dict], dict]:
    b = Bundle.open(bundle_dir)
    dtype = b.manifest["model"]["dtype"]
    rows = []
    for role in b.roles:
        prog = json.loads((b.path / "programs" / f"{role['program']}.json").read_text())
        wmap = json.loads((b.path / "weights" / f"{role['program']}.json").read_text())
        ops = Counter(
            n["target"].split(".")[3] for n in prog["nodes"] if n["op"] == "call_function" and n["target"].startswith("torch.ops.msc.")
        )
        params, nbytes = 0, 0
        for e in wmap.values():
            numel = 1
            for s in e["shape"]:
                numel *= s
            params += numel
            nbytes += numel * _BYTES.get(e["dtype"] if "constant" in e["source"] else dtype, 4)
        rows.append({
            "role": role["name"], "rank": role["rank"], "program": role["program"], "nodes": len(prog["nodes"]),
            "msc_ops": ", ".join(f"{k}×{v}" for k, v in sorted(ops.items())), "parameters": params, "bytes": nbytes,
            "bytes_h": human_bytes(nbytes),
        })
    return rows, b.manifest
