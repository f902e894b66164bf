"""Planner calibration (issue 22's GPU line): does `msc profile` then the planner predict the engine's measured
decode step, colocated and as two role processes, within 10 %? (GPU; one run writes every figure.)

Mixtral-8x7B's shape with --layers layers, bf16, random weights:
1. `msc profile` of that model on this GPU at the same batches (the planner's linear fits and the exchange's
   hand-off, from its own runs; or --profile FILE measured before);
2. measured: the colocated engine's decode step and two role processes' (1 attention replica + 1 expert node
   on this GPU, the device exchange under MPS, m = 1) at each batch, --input-len prompt tokens, median decode
   step (benchmarks/engine_step.py's functions);
3. predicted with the profile: the colocated step (`perf.colocated_step`, one GPU) and the disaggregated step of
   that plan (`perf.disaggregated_step`, n_a = n_e = m = 1, the exchange over NVLink: both roles in one node).

    python benchmarks/plan_calibration.py --layers 16 --batches 16,32,64,128,256 --out plan_calibration.json
    python benchmarks/plan_calibration.py --model tiny --device cpu --batches 2,4 --input-len 16   # smoke (roofline)

NOTE: the two roles share one GPU here, so the measured step is the serial one (m = 1: attention, exchange,
experts per layer), which is also what the planner's m = 1 formula is.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_step import MIXTRAL_8X7B, TINY, _bundle, colocated, roles, stop_mps  # noqa: E402


def predictions(bundle_dir: str, batches: list[int], ctx: float, gpu: str, profile_path: str | None) -> dict:
    """Predicted colocated and two-role decode steps (seconds) per batch."""
    from msc.bundle import Bundle
    from msc.planner.cost import cost_of_spec
    from msc.planner.hardware import get_gpu, load_catalogue
    from msc.planner.perf import Efficiency, colocated_step, disaggregated_step, load_profile
    from msc.planner.search import over_nvlink, side_of
    from msc.spec import parse_spec

    manifest = Bundle.open(bundle_dir).manifest
    spec = parse_spec(manifest["spec"])
    cost, _ = cost_of_spec(spec)
    prof = load_profile(profile_path) if profile_path else None
    g = get_gpu(gpu, load_catalogue(None, None))
    eff = Efficiency()
    one = side_of(g, 1)
    out = {}
    for b in batches:
        col = colocated_step(cost, b, ctx, one, eff, prof)
        dis = disaggregated_step(cost, b, 1, 1, 1, ctx, over_nvlink(one), over_nvlink(one), eff, prof).total
        out[b] = {"colocated_s": col, "roles_s": dis}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["mixtral", "tiny"], default="mixtral")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--batches", default="16,32,64,128,256")
    ap.add_argument("--input-len", type=int, default=571)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--profile", help="a profile measured before (default: run msc profile now; none on the CPU)")
    ap.add_argument("--gpu", default=None, help="catalogue GPU for the predictions (default: from the device name)")
    ap.add_argument("--out", default="plan_calibration.json")
    args = ap.parse_args()
    batches = [int(x) for x in args.batches.split(",") if x]
    dev = args.device
    gpu = args.gpu or ("H200" if dev != "cuda" or "H200" in torch.cuda.get_device_name() else "H100-SXM")
    ctx = args.input_len + args.output_len / 2
    g = torch.Generator().manual_seed(0)
    vocab = (MIXTRAL_8X7B if args.model == "mixtral" else TINY)["vocab_size"]
    prompts = torch.randint(3, vocab, (max(batches), args.input_len), generator=g).tolist()
    with tempfile.TemporaryDirectory(prefix="msc-calib-") as tmp:
        bundle = _bundle(tmp, args.model, args.layers, max(batches), args.input_len + args.output_len + 32)
        profile = args.profile
        if profile is None and dev == "cuda":  # msc profile of the same model (its spec, written as YAML)
            import yaml

            spec_file = Path(tmp) / "spec.yaml"
            spec = dict(bundle.manifest["spec"])
            spec_file.write_text(yaml.safe_dump(spec))
            profile = str(Path(tmp) / "profile.json")
            subprocess.run([sys.executable, "-m", "msc.cli", "profile", str(spec_file), "-o", profile, "--gpu", gpu,
                            "--contexts", f"{args.input_len},{int(ctx * 2 - args.input_len)}",
                            "--batches", args.batches], check=True)
            prof_doc = json.loads(Path(profile).read_text())
        else:
            prof_doc = json.loads(Path(profile).read_text()) if profile else None
        pred = predictions(str(bundle.path), batches, ctx, gpu, profile)
        col = {r["batch"]: r for r in colocated(bundle, prompts, batches, args.output_len, dev)}
        rows = []
        for b in batches:
            r = roles(bundle, prompts[:b], args.output_len, 1, dev, "device-mps" if dev == "cuda" else "device")
            m_col, m_roles = col[b]["step_s"], r["step_s"]
            p = pred[b]
            rows.append({"batch": b, "colocated_measured_s": m_col, "colocated_predicted_s": p["colocated_s"],
                         "colocated_error": p["colocated_s"] / m_col - 1, "roles_measured_s": m_roles,
                         "roles_predicted_s": p["roles_s"], "roles_error": p["roles_s"] / m_roles - 1})
    stop_mps()
    print(f"\n{args.model}, {args.layers} layers, context {ctx:g}, GPU {torch.cuda.get_device_name() if dev == 'cuda' else 'none'}"
          f", predictions for {gpu} {'with the profile' if profile else '(roofline: no profile)'}")
    print("| batch | colocated measured ms | predicted | error | two roles measured ms | predicted | error |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['colocated_measured_s'] * 1e3:.2f} | {r['colocated_predicted_s'] * 1e3:.2f} | "
              f"{r['colocated_error']:+.0%} | {r['roles_measured_s'] * 1e3:.2f} | {r['roles_predicted_s'] * 1e3:.2f} | "
              f"{r['roles_error']:+.0%} |")
    worst = max(max(abs(r["colocated_error"]), abs(r["roles_error"])) for r in rows)
    print(f"worst error {worst:.0%} (issue 22 asks for 10 % at every point)")
    from msc.bench import machine_info

    meta = {**machine_info(("torch", "triton", "transformers")), "model": args.model, "layers": args.layers,
            "context": ctx, "gpu_catalogue": gpu, "profile": prof_doc}
    Path(args.out).write_text(json.dumps({"benchmark": "plan_calibration", "meta": meta, "rows": rows,
                                          "median_abs_error": statistics.median(
                                              abs(r[k]) for r in rows for k in ("colocated_error", "roles_error"))},
                                         indent=1))


if __name__ == "__main__":
    main()
