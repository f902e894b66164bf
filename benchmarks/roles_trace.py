"""Where a decode step of the role processes goes (GPU): attention and experts as two processes on one GPU,
Mixtral-8x7B shape with random weights, traced by the runtime; prints each role's time per decode step by
kind (compute = host time running the stage code, send / recv / wait = blocked on the transport).

    python benchmarks/roles_trace.py --layers 16 --batch 64 --out roles_trace.json

GPU work is asynchronous: a role's `compute` is the host time spent issuing it, and the GPU time shows
up wherever the role next synchronises (the cuda_ipc send waits for the payload to be ready).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_decode import MIXTRAL_8X7B  # noqa: E402


def breakdown(trace: dict, batch: int) -> dict:
    """Per role: milliseconds per decode step by category, over the forwards that decoded (≤ batch tokens)
    except the first (it compiles the decode kernels: seconds of Triton JIT)."""
    events = trace["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e["name"] == "process_name"}
    steps = [e for e in events if e.get("cat") == "step"]
    decode = sorted(e["args"]["step"] for e in steps if e["args"]["tokens"] <= batch)[1:]
    window = [e for e in steps if e["args"]["step"] in decode]
    lo = min(e["ts"] for e in window)
    hi = max(e["ts"] + e["dur"] for e in window)
    out = {"decode_steps": len(decode), "step_ms": (hi - lo) / 1e3 / len(decode), "roles": {}}
    for pid, name in sorted(names.items()):
        sums: dict[str, float] = {}
        for e in events:
            if e.get("pid") == pid and e.get("ph") == "X" and e.get("tid") == 0 and lo <= e["ts"] < hi:
                sums[e["cat"]] = sums.get(e["cat"], 0.0) + e["dur"]
        out["roles"][f"{name} (rank {pid})"] = {cat: us / 1e3 / len(decode) for cat, us in sorted(sums.items())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=571)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default="roles_trace.json")
    args = ap.parse_args()
    from msc.compiler import compile_spec
    from msc.runtime.launcher import run_bundle
    from msc.spec import parse_spec

    spec = parse_spec({"model": {"config": {"model_type": "mixtral", **MIXTRAL_8X7B, "num_hidden_layers": args.layers},
                                 "dtype": "bfloat16"}, "device": "meta",
                       "plan": {"attention": {"replicas": 1}, "experts": {"nodes": 1}, "microbatches": 1,
                                "batch_size": args.batch}, "runtime": {"timeout_s": 600}})
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, MIXTRAL_8X7B["vocab_size"], (args.batch, args.input_len), generator=g).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = compile_spec(spec, f"{tmp}/b")
        res = run_bundle(bundle.path, prompts, args.new_tokens, random_weights=True, device="cuda", timeout_s=540,
                         trace=f"{tmp}/trace.json")
        trace = json.loads(Path(f"{tmp}/trace.json").read_text())
        Path(args.out).with_suffix(".trace.json").write_text(json.dumps(trace))  # for Perfetto / msc trace-plot
    steps = sorted(res["decode_times"][0])
    out = breakdown(trace, args.batch)
    out.update(median_decode_step_ms=steps[len(steps) // 2] * 1e3, layers=args.layers, batch=args.batch,
               meta={"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version()})
    print(f"median decode step {out['median_decode_step_ms']:.2f} ms; traced window {out['step_ms']:.2f} ms/step "
          f"over {out['decode_steps']} decode steps")
    print("| role | " + " | ".join(f"{c} ms/step" for c in ("compute", "send", "recv", "wait")) + " |")
    print("|---|---|---|---|---|")
    for role, cats in out["roles"].items():
        print(f"| {role} | " + " | ".join(f"{cats.get(c, 0.0):.2f}" for c in ("compute", "send", "recv", "wait")) + " |")
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
