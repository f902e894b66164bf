"""`msc run --colocated --record-routing`: the recorded counts against transformers' own router on the same
tokens, and the file as the planner reads it."""
from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from msc.cli import app
from msc.planner.routing import load_routing

PROMPTS = [[5, 17, 42, 100, 3], [7, 7], [1, 2, 3, 4, 5, 6, 200, 9]]


def test_recorded_routing_equals_transformers_router(tiny_bundle, tiny_hf, tmp_path):
    out = tmp_path / "routing.json"
    ids = [a for p in PROMPTS for a in ("--input-ids", ",".join(map(str, p)))]
    res = CliRunner().invoke(app, ["run", str(tiny_bundle.path), "--colocated", "--device", "cpu", *ids,
                                   "--max-new-tokens", "6", "--json", "--record-routing", str(out)])
    assert res.exit_code == 0, res.output
    outputs = json.loads(res.stdout.strip().splitlines()[-1])["outputs"]
    cfg = tiny_hf.config
    want = torch.zeros(cfg.num_hidden_layers, cfg.num_local_experts, dtype=torch.int64)
    with torch.no_grad():
        for p, o in zip(PROMPTS, outputs):
            seq = torch.tensor([p + o[:-1]])  # every token the engine fed through the model
            logits = tiny_hf(seq, output_router_logits=True).router_logits  # per layer [T, E]
            for layer, lg in enumerate(logits):
                top = lg.reshape(-1, cfg.num_local_experts).topk(cfg.num_experts_per_tok, dim=-1).indices
                want[layer] += torch.bincount(top.reshape(-1), minlength=cfg.num_local_experts)
    prof = load_routing(out)
    assert prof.experts == cfg.num_local_experts
    assert {layer: list(c) for layer, c in prof.layers.items()} == {i: want[i].tolist() for i in range(len(want))}


def test_role_processes_record_the_same_routing(tiny_bundle, tmp_path):
    """Without --colocated the attention replica records at its dispatch: the same counts for the same tokens."""
    ids = [a for p in PROMPTS for a in ("--input-ids", ",".join(map(str, p)))]
    files = {}
    for how in ("colocated", "roles"):
        files[how] = tmp_path / f"{how}.json"
        args = ["run", str(tiny_bundle.path), *ids, "--max-new-tokens", "6", "--json", "--record-routing", str(files[how])]
        res = CliRunner().invoke(app, args + (["--colocated", "--device", "cpu"] if how == "colocated" else []))
        assert res.exit_code == 0, res.output
    a, b = load_routing(files["colocated"]), load_routing(files["roles"])
    assert a.layers == b.layers and sum(sum(c) for c in a.layers.values()) > 0


def test_serving_records_the_routing_on_close(tiny_bundle, tmp_path):
    """msc serve --record-routing: the role processes' and the colocated server's counts, written when the server
    closes, equal the colocated run's for the same greedy requests."""
    from msc.engine.request import SamplingParams
    from msc.runtime.serving import ColocatedServingEngine, ServingEngine

    ids = [a for p in PROMPTS for a in ("--input-ids", ",".join(map(str, p)))]
    want = tmp_path / "run.json"
    res = CliRunner().invoke(app, ["run", str(tiny_bundle.path), "--colocated", "--device", "cpu", *ids,
                                   "--max-new-tokens", "6", "--record-routing", str(want)])
    assert res.exit_code == 0, res.output
    for name, cls in (("roles", ServingEngine), ("colocated", ColocatedServingEngine)):
        out = tmp_path / f"serve_{name}.json"
        eng = cls(tiny_bundle.path, record_routing=out).start(timeout_s=120)
        try:
            handles = [eng.submit(p, params=SamplingParams(max_tokens=6, ignore_eos=True)) for p in PROMPTS]
            for h in handles:
                h.result(timeout=120)
        finally:
            eng.close()
        assert load_routing(out).layers == load_routing(want).layers, name
