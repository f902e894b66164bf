"""One rank of a tests.comm.harness run (see there)."""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from datetime import timedelta

import torch.distributed as dist


def main() -> int:
    ap = argparse.ArgumentParser()
    for a in ("--target", "--args", "--out", "--store"):
        ap.add_argument(a, required=True)
    for a in ("--rank", "--world"):
        ap.add_argument(a, type=int, required=True)
    a = ap.parse_args()
    kind, where = a.store.split(":", 1)
    if kind == "file":
        store = dist.FileStore(where, a.world)
        store.set_timeout(timedelta(seconds=60))
    else:
        store = dist.TCPStore("127.0.0.1", int(where), a.world, is_master=False, timeout=timedelta(seconds=60))
    module, fn = a.target.split(":")
    result = getattr(importlib.import_module(module), fn)(a.rank, a.world, store, json.loads(a.args))
    with open(a.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
