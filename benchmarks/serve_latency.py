"""Serving latency on the embedded tiny Mixtral (CPU): a lone request, and a short request that arrives while
a long one decodes. The second is what continuous batching is for: with rounds it waited for the long one.

    python benchmarks/serve_latency.py --out serve_latency.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lone", type=int, default=20, help="sequential one-token requests")
    ap.add_argument("--long", type=int, default=600, help="tokens of the long request")
    ap.add_argument("--out", default="serve_latency.json")
    args = ap.parse_args()
    from msc.bench import machine_info
    from msc.compiler import compile_spec
    from msc.engine.request import SamplingParams
    from msc.runtime.serving import ServingEngine
    from msc.spec import default_spec

    with tempfile.TemporaryDirectory() as tmp:
        bundle = compile_spec(default_spec(), Path(tmp) / "b")
        eng = ServingEngine(bundle.path).start(timeout_s=120)
        try:
            eng.generate([[1, 2]], 1)  # warm-up
            lone = []
            for _ in range(args.lone):
                t = time.perf_counter()
                eng.generate([[5, 17, 42]], 1)
                lone.append(time.perf_counter() - t)
            long = eng.submit([3, 4, 5], params=SamplingParams(max_tokens=args.long, ignore_eos=True))
            next(long.stream(timeout=60))  # the long request is decoding
            t = time.perf_counter()
            eng.submit([7, 7], 2).result(timeout=300)
            short = time.perf_counter() - t
            long_left = args.long - len(long.tokens)
            long.result(timeout=600)
        finally:
            eng.close()
    result = {"benchmark": "serve_latency", "machine": machine_info(), "lone_p50_s": statistics.median(lone),
              "lone_max_s": max(lone), "short_behind_long_s": short, "long_tokens_left_when_short_ended": long_left}
    print(f"lone request p50 {result['lone_p50_s'] * 1e3:.1f} ms (max {result['lone_max_s'] * 1e3:.1f}); a 2-token "
          f"request behind a {args.long}-token one: {short * 1e3:.1f} ms ({long_left} of the long one's tokens still to come)")
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
