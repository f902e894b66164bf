"""How many checkpoint bytes an attention tensor-parallel rank reads, as a share of the tp = 1 role.

The tiny test Mixtral (tests/models/families.py), saved by transformers' save_pretrained with 40 KB shards,
compiled with plan.attention.tp 1, 2 and 4; each rank's program is loaded through a CheckpointReader whose
counter says what left the disk. A byte count, not a timing: the same on every machine.

    python benchmarks/tp_bytes.py [--out tp_bytes.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.models.families


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tp_bytes.json")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    from msc.bench import machine_info
    from msc.bundle import Bundle
    from msc.checkpoint import CheckpointReader
    from msc.compiler import compile_spec
    from msc.spec import parse_spec
    from tests.models.families import FAMILIES

    tmp = Path(tempfile.mkdtemp(prefix="msc-tp-bytes-"))
    spec = {"model": {"config": FAMILIES["mixtral"], "seed": 0, "dtype": "float32"}, "device": "cpu",
            "plan": {"experts": {"nodes": 2}}}
    ref = compile_spec(parse_spec(spec), tmp / "ref")
    hf = AutoModelForCausalLM.from_pretrained(str(ref.checkpoint_dir()), dtype=torch.float32)
    hf.save_pretrained(tmp / "sharded", max_shard_size="40KB")
    read: dict[int, list[int]] = {}
    for tp in (1, 2, 4):
        s = parse_spec({"model": {"path": str(tmp / "sharded"), "dtype": "float32"}, "device": "cpu",
                        "plan": {"experts": {"nodes": 2}, "attention": {"tp": tp}}})
        bundle = Bundle.open(compile_spec(s, tmp / f"tp{tp}").path)
        read[tp] = []
        for r in range(tp):
            reader = CheckpointReader(tmp / "sharded")
            bundle.load_program("attention" if tp == 1 else f"attention.tp{r}", "cpu", reader=reader, progress=False)
            read[tp].append(reader.bytes_read)
            reader.close()
    whole = read[1][0]
    print("tp  bytes per rank          share of the tp=1 role")
    rows = []
    for tp, per_rank in read.items():
        share = [round(b / whole, 3) for b in per_rank]
        print(f"{tp:<3} {per_rank!s:<23} {share}")
        rows.append({"tp": tp, "bytes": per_rank, "share": share})
    Path(args.out).write_text(json.dumps({"benchmark": "tp_bytes", "meta": machine_info(), "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
