"""The engine's host time per decode step (scheduler, step metadata, sampling, bookkeeping) with a model that
does nothing: what a GPU step waits for on the host. B requests of --prompt tokens, decoding.

    python benchmarks/engine_host.py --batch 64,256 --out engine_host.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


class NoModel:
    """A runner that builds a decode step's metadata, as the CUDA-graph path does, and returns zero logits."""

    device = torch.device("cpu")

    def __init__(self, vocab: int, pad_to: int):
        self.vocab, self.pad_to = vocab, pad_to

    def make_cache(self, num_blocks, page_size, max_seq_len):
        from msc.runtime.paged_kv import PagedKVCache

        self.cache = PagedKVCache(1, num_blocks, page_size, 1, 8, 8, torch.float32, "cpu", max_seq_len)
        _ = self.cache.scratch_slot
        return self.cache

    def execute(self, step):
        from msc.runtime.paged_kv import StepMeta

        if step.decode_only:
            StepMeta.for_decode(self.cache, step.seq_ids, step.contexts, pad_to=self.pad_to)
        return torch.zeros(len(step.sample_rows), self.vocab)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", default="64,256")
    ap.add_argument("--prompt", type=int, default=571)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", default="engine_host.json")
    args = ap.parse_args()
    from msc.bench import machine_info
    from msc.engine.engine import Engine
    from msc.engine.request import SamplingParams

    rows = []
    for b in [int(x) for x in args.batch.split(",")]:
        eng = Engine(NoModel(args.vocab, b), [], max_batch=b, max_seq_len=args.prompt + args.steps + 64,
                     kv_tokens=b * (args.prompt + args.steps + 64))
        for i in range(b):
            eng.add_request(str(i), [1] * args.prompt, SamplingParams(max_tokens=args.steps + 8, ignore_eos=True))
        while eng.num_waiting or any(r.computed < len(r.prompt) for r in eng.scheduler.running):
            eng.step()
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            eng.step()
            times.append(time.perf_counter() - t)
        argmax = []
        x = torch.zeros(b, args.vocab)
        for _ in range(args.steps):
            t = time.perf_counter()
            x.argmax(-1).tolist()
            argmax.append(time.perf_counter() - t)
        rows.append({"batch": b, "step_p50_s": statistics.median(times), "cpu_argmax_p50_s": statistics.median(argmax)})
        r = rows[-1]
        print(f"batch {b}: host {r['step_p50_s'] * 1e3:.2f} ms a decode step, of which the CPU argmax "
              f"{r['cpu_argmax_p50_s'] * 1e3:.2f} ms (on a GPU it runs on the device)")
    Path(args.out).write_text(json.dumps({"benchmark": "engine_host", "machine": machine_info(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
