"""Tensor-parallel role processes (plan.attention.tp, plan.experts.tp > 1), against transformers.

Each replica's tp ranks hold their share of the heads, each expert node's tp ranks their share of every
expert's intermediate dimension (shard_tensor_parallel); a group's leader is its M2N endpoint and shares
what it receives with its followers. Greedy tokens must equal transformers' generate, with logits within
1e-4, for 1-2 replicas, 2 expert nodes and m = 1..3.
"""
from __future__ import annotations

import json

import pytest

from msc.compiler import compile_spec
from msc.errors import MscError
from msc.runtime.launcher import run_bundle
from msc.spec import parse_spec
from msc.verify import max_logit_error, reference_generate
from tests.models.families import FAMILIES

PROMPTS = [[5, 17, 42, 8], [7, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [9]]
ARRIVALS = [0, 0, 2, 3]
NEW = 6
# family -> (attention tp, experts tp, replicas, m); together tp 1, 2 and 4 on both sides, 1 and 2 replicas,
# m 1..3 (DeepSeek-V3: MLA, whose latent projections stay whole on every rank).
CASES = {"mixtral": [(2, 1, 1, 1), (4, 2, 2, 3), (1, 4, 1, 2)], "qwen3_moe": [(2, 2, 2, 2), (4, 4, 1, 1)],
         "deepseek_v3": [(2, 2, 2, 1), (4, 4, 1, 3)], "gpt_oss": [(4, 2, 1, 2), (2, 4, 2, 1)],
         "dbrx": [(2, 1, 1, 2)]}


@pytest.fixture(scope="module")
def reference(family_bundle):
    """family -> (spec dict, transformers model, its greedy continuation of each prompt)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            d, _, hf = family_bundle(name)
            cache[name] = (d, hf, [reference_generate(hf, p, NEW) for p in PROMPTS])
        return cache[name]

    return get


@pytest.mark.parametrize("name,case", [(n, c) for n, cs in sorted(CASES.items()) for c in cs],
                         ids=[f"{n}-atp{c[0]}-etp{c[1]}-r{c[2]}-m{c[3]}" for n, cs in sorted(CASES.items()) for c in cs])
def test_tp_roles_generate_transformers_tokens(reference, tmp_path, name, case):
    tp, etp, replicas, m = case
    d, hf, refs = reference(name)
    spec = parse_spec({**d, "plan": {**d["plan"], "attention": {"replicas": replicas, "tp": tp},
                                     "experts": {"nodes": 2, "tp": etp}, "microbatches": m}})
    bundle = compile_spec(spec, tmp_path / "b")
    kinds = [r["kind"] for r in bundle.manifest["roles"]]
    assert kinds.count("attention") == replicas and kinds.count("attention_tp") == replicas * (tp - 1)
    assert kinds.count("expert") == 2 and kinds.count("expert_tp") == 2 * (etp - 1)
    res = run_bundle(bundle.path, PROMPTS, NEW, arrivals=ARRIVALS, dump_logits=True)
    assert res["outputs"] == refs
    assert max_logit_error(hf, PROMPTS, res["outputs"], res["logits"]) < 1e-4


def test_each_expert_tp_rank_reads_its_share_of_the_expert_weights(reference, tmp_path):
    from msc.checkpoint import CheckpointReader

    d, _, _ = reference("mixtral")
    totals = {}
    for etp in (1, 2, 4):
        spec = parse_spec({**d, "plan": {**d["plan"], "experts": {"nodes": 2, "tp": etp}}})
        bundle = compile_spec(spec, tmp_path / f"etp{etp}")
        reader = CheckpointReader(bundle.checkpoint_dir())
        programs = ["expert.0"] if etp == 1 else [f"expert.0.tp{r}" for r in range(etp)]
        totals[etp] = [sum(reader.source_nbytes(w["source"]) for w in
                           json.loads((bundle.path / "weights" / f"{p}.json").read_text()).values()) for p in programs]
    full = totals[1][0]
    for etp in (2, 4):
        assert all(b == full // etp for b in totals[etp]), (etp, totals[etp], full)


def test_each_attention_tp_rank_reads_about_1_over_tp_of_its_roles_bytes(reference, tmp_path):
    """From a sharded checkpoint (transformers' save_pretrained with small shards): heads, vocabulary rows
    and output columns are split; only norms, router and (past the key/value heads) k and v are not."""
    from msc.bundle import Bundle
    from msc.checkpoint import INDEX, CheckpointReader

    d, hf, _ = reference("mixtral")
    ckpt = tmp_path / "sharded"
    hf.save_pretrained(ckpt, max_shard_size="40KB")
    assert (ckpt / INDEX).exists()
    read = {}
    for tp in (1, 2, 4):
        spec = parse_spec({"model": {"path": str(ckpt), "dtype": "float32"}, "device": "cpu",
                           "plan": {**d["plan"], "attention": {"tp": tp}}})
        bundle = Bundle.open(compile_spec(spec, tmp_path / f"tp{tp}").path)
        read[tp] = []
        for r in range(tp):
            reader = CheckpointReader(ckpt)
            bundle.load_program("attention" if tp == 1 else f"attention.tp{r}", "cpu", reader=reader, progress=False)
            read[tp].append(reader.bytes_read)
            reader.close()
    whole = read[1][0]
    assert all(abs(b / whole - 1 / 2) < 0.03 for b in read[2]), read
    # tp 4 > the 2 key/value heads: k and v are read by two ranks each (a bit over 1/4)
    assert all(1 / 4 <= b / whole < 1 / 4 + 0.08 for b in read[4]), read


def test_random_weights_of_a_tp_bundle_are_the_same_model(tmp_path):
    """Random weights (a bundle compiled for meta) are made whole and then shared out, so tp changes nothing."""
    spec = {"model": {"config": FAMILIES["qwen3_moe"], "seed": 0, "dtype": "float32"}, "device": "meta",
            "plan": {"experts": {"nodes": 2}}}
    one = run_bundle(compile_spec(parse_spec(spec), tmp_path / "a").path, PROMPTS, NEW, random_weights=True, device="cpu")
    spec["plan"] = {"experts": {"nodes": 2, "tp": 2}, "attention": {"tp": 2}}
    two = run_bundle(compile_spec(parse_spec(spec), tmp_path / "b").path, PROMPTS, NEW, random_weights=True, device="cpu")
    assert two["outputs"] == one["outputs"]


def test_tp_that_does_not_split_the_heads_is_a_compile_error(reference, tmp_path):
    d, _, _ = reference("mixtral")
    spec = parse_spec({**d, "plan": {**d["plan"], "attention": {"tp": 3}}})
    with pytest.raises(MscError, match="plan.attention.tp = 3 does not divide the model's 4 attention heads"):
        compile_spec(spec, tmp_path / "b")
    assert not (tmp_path / "b").exists()
    spec = parse_spec({**d, "plan": {**d["plan"], "experts": {"nodes": 2, "tp": 5}}})
    with pytest.raises(MscError, match="plan.experts.tp = 5 does not divide the experts' intermediate size 96"):
        compile_spec(spec, tmp_path / "c")


def test_families_not_split_yet_are_refused_naming_the_piece(reference, tmp_path):
    d, _, _ = reference("dbrx")
    spec = parse_spec({**d, "plan": {**d["plan"], "experts": {"nodes": 2, "tp": 2}}})
    with pytest.raises(MscError, match="layer 0's experts are stored as .* msc splits per-expert"):
        compile_spec(spec, tmp_path / "fused")


def test_tp_serving_streams_the_same_tokens(reference, tmp_path):
    from msc.engine.request import SamplingParams
    from msc.runtime.serving import ServingEngine

    d, _, refs = reference("mixtral")
    spec = parse_spec({**d, "plan": {**d["plan"], "attention": {"tp": 2}}})
    bundle = compile_spec(spec, tmp_path / "b")
    with ServingEngine(bundle.path) as engine:
        handles = [engine.submit(p, params=SamplingParams(max_tokens=NEW)) for p in PROMPTS]
        assert [h.result(timeout=120).token_ids for h in handles] == refs
        seeded = [engine.submit(PROMPTS[0], params=SamplingParams(max_tokens=NEW, temperature=1.0, seed=3)) for _ in range(2)]
        a, b = (h.result(timeout=120).token_ids for h in seeded)
        assert a == b
        assert engine.health()["status"] == "ok"


def test_inspect_shows_the_tp_groups(reference, tmp_path):
    from msc.inspect import role_table

    d, _, _ = reference("mixtral")
    spec = parse_spec({**d, "plan": {**d["plan"], "attention": {"replicas": 2, "tp": 2}}})
    bundle = compile_spec(spec, tmp_path / "b")
    rows, _ = role_table(bundle.path)
    groups = {r["role"]: r["tp"] for r in rows}
    assert groups == {"attention.0": "0/2 [0, 4]", "attention.1": "0/2 [1, 5]", "expert.0": "-", "expert.1": "-",
                      "attention.0.tp1": "1/2 [0, 4]", "attention.1.tp1": "1/2 [1, 5]"}
    # the followers hold the same number of parameters as their leaders (each its own share)
    by = {r["role"]: r for r in rows}
    assert by["attention.0"]["parameters"] == by["attention.0.tp1"]["parameters"]
    launch = (bundle.path / "launch" / "torchrun_attention.1.tp1.sh").read_text()
    assert "--node-rank 5 " in launch and "tensor-parallel rank 1 of 2 with ranks [1, 5]" in launch


@pytest.mark.parametrize("role", ["attention.0.tp1", "expert.1.tp1"])
def test_a_dead_tp_rank_fails_the_run_naming_it(reference, tmp_path, role):
    import time

    from msc.runtime.worker import FAULT_AFTER, FAULT_ROLE

    d, _, _ = reference("mixtral")
    spec = parse_spec({**d, "plan": {**d["plan"], "attention": {"tp": 2}, "experts": {"nodes": 2, "tp": 2}}})
    bundle = compile_spec(spec, tmp_path / "b")
    t0 = time.monotonic()
    with pytest.raises(MscError, match=f"role {role.replace('.', '[.]')} .*exited with code 17"):
        run_bundle(bundle.path, PROMPTS, 8, env={FAULT_ROLE: role, FAULT_AFTER: "2"}, timeout_s=120)
    assert time.monotonic() - t0 < 60


def test_a_tp_group_whose_ranks_would_share_a_gpu_is_refused():
    """NCCL needs one GPU per rank: on a host with fewer GPUs than a group has ranks, a clear error (before
    any GPU is touched), not a hang or an NCCL crash."""
    from datetime import timedelta

    from msc.runtime.tensor_parallel import make_group

    one_gpu = lambda rank: rank % 1  # noqa: E731 (role_device's map on a 1-GPU host)
    with pytest.raises(MscError, match=r"one GPU per rank of a group; ranks \[0, 3\] would share GPUs \[0, 0\]"):
        make_group(None, {"rank": 0, "size": 2, "ranks": [0, 3]}, "cuda:0", timedelta(seconds=5), one_gpu)


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v3"])
def test_tp_roles_with_sibling_linears_fused(reference, tmp_path, name):
    """The sibling-linear fusion (a GPU's default; forced here with MSC_FUSE_LINEARS=1) on tp ranks' shards of
    q / k / v (and DeepSeek's q_a / kv_a, whole on every rank): transformers' tokens still."""
    d, hf, refs = reference(name)
    spec = parse_spec({**d, "plan": {**d["plan"], "attention": {"replicas": 1, "tp": 2},
                                     "experts": {"nodes": 2, "tp": 2}, "microbatches": 2}})
    bundle = compile_spec(spec, tmp_path / "b")
    res = run_bundle(bundle.path, PROMPTS, NEW, arrivals=ARRIVALS, dump_logits=True, env={"MSC_FUSE_LINEARS": "1"})
    assert res["outputs"] == refs
    assert max_logit_error(hf, PROMPTS, res["outputs"], res["logits"]) < 1e-4
