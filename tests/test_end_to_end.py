"""The whole path: compile -> separate role processes -> same tokens and logits as transformers."""
import json
import time

import pytest
import torch
from typer.testing import CliRunner

from msc.cli import app
from msc.compiler import compile_spec
from msc.errors import MscError
from msc.runtime.launcher import run_bundle
from msc.runtime.worker import FAULT_AFTER, FAULT_ROLE
from msc.spec import parse_spec
from msc.verify import reference_generate, verify_bundle
from tests.conftest import tiny_spec_dict

PROMPTS = [[5, 17, 42, 100, 3], [7, 7], [1, 2, 3, 4, 5, 6, 200, 9]]


def test_one_attention_two_expert_processes_match_hf_generate(tiny_bundle, tiny_hf):
    assert [r["name"] for r in tiny_bundle.roles] == ["attention.0", "expert.0", "expert.1"]
    res = run_bundle(tiny_bundle.path, PROMPTS, 8)
    assert res["transport"] == "shm"  # the default for roles on one host
    refs = [reference_generate(tiny_hf, p, 8) for p in PROMPTS]
    assert res["outputs"] == refs
    assert all(len(o) == 8 or o[-1] == tiny_hf.config.eos_token_id for o in res["outputs"])


@pytest.mark.parametrize("transport", ["tcp", "torch_dist"])
def test_every_cpu_transport_gives_the_reference_tokens(tmp_path, tiny_hf, transport):
    spec = parse_spec({**tiny_spec_dict(), "plan": {"attention": {"replicas": 2}, "experts": {"nodes": 2}},
                       "runtime": {"transport": transport}})
    res = run_bundle(compile_spec(spec, tmp_path / "b").path, PROMPTS, 6)
    assert res["transport"] == transport
    assert res["outputs"] == [reference_generate(tiny_hf, p, 6) for p in PROMPTS]


def test_verify_reports_logits_within_1e_4(tiny_bundle):
    r = verify_bundle(tiny_bundle.path, PROMPTS, 8)
    assert r["tokens_match"] is True
    assert 0 <= r["max_abs_logit_err"] < 1e-4


def test_cli_run_json_interface(tiny_bundle, tiny_hf):
    res = CliRunner().invoke(app, ["run", str(tiny_bundle.path), "--input-ids", "5,17,42", "--input-ids", "7,7",
                                   "--max-new-tokens", "8", "--json"])
    assert res.exit_code == 0, res.output
    outputs = json.loads(res.stdout)["outputs"]
    assert outputs == [reference_generate(tiny_hf, [5, 17, 42], 8), reference_generate(tiny_hf, [7, 7], 8)]


def test_two_attention_replicas_three_expert_nodes(tmp_path, tiny_hf):
    spec = parse_spec({**tiny_spec_dict(), "plan": {"attention": {"replicas": 2}, "experts": {"nodes": 3}}})
    bundle = compile_spec(spec, tmp_path / "b")
    ours = run_bundle(bundle.path, PROMPTS, 6)["outputs"]
    assert ours == [reference_generate(tiny_hf, p, 6) for p in PROMPTS]


def test_small_batch_size_queues_the_rest_and_admits_them_as_others_finish(tmp_path, tiny_hf):
    bundle = compile_spec(parse_spec({**tiny_spec_dict(), "plan": {"experts": {"nodes": 2}, "batch_size": 2}}), tmp_path / "b")
    limits = [2, 6, 4][: len(PROMPTS)]
    res = run_bundle(bundle.path, PROMPTS, limits)
    assert res["outputs"] == [reference_generate(tiny_hf, p, n) for p, n in zip(PROMPTS, limits)]
    recs = res["records"][0]
    assert all(len(r["decode"]) + len(r["prefill"]) <= 2 for r in recs)  # never more than batch_size running
    assert any(r["prefill"] and r["decode"] for r in recs)  # a queued prompt joined while another decoded


@pytest.mark.parametrize("role", ["expert.1", "attention.0"])
def test_dead_role_fails_the_run_naming_it(tiny_bundle, role):
    t0 = time.monotonic()
    with pytest.raises(MscError, match=f"role {role.replace('.', '[.]')} .*exited with code 17"):
        run_bundle(tiny_bundle.path, PROMPTS, 8, env={FAULT_ROLE: role, FAULT_AFTER: "2"}, timeout_s=120)
    assert time.monotonic() - t0 < 60


def test_matches_hf_generate_on_the_left_padded_batch(tiny_bundle, tiny_hf):
    """transformers' batched generate (left padding) gives the same tokens as msc's packed batch."""
    width = max(len(p) for p in PROMPTS)
    pad = tiny_hf.config.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    with torch.no_grad():
        out = tiny_hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=pad)
    refs = []
    for row in out[:, width:].tolist():
        refs.append(row[: row.index(pad) + 1] if pad in row else row)
    assert run_bundle(tiny_bundle.path, PROMPTS, 8)["outputs"] == refs


def test_profile_dir_gets_one_profile_per_role_and_the_same_tokens(tiny_bundle, tiny_hf, tmp_path):
    """MSC_PROFILE_DIR (a debugging aid) profiles every role process without changing what it computes."""
    import pstats

    res = run_bundle(tiny_bundle.path, PROMPTS, 4, env={"MSC_PROFILE_DIR": str(tmp_path)})
    assert res["outputs"] == [reference_generate(tiny_hf, p, 4) for p in PROMPTS]
    profiles = sorted(tmp_path.glob("role.*.prof"))
    assert [p.name for p in profiles] == [f"role.{r}.prof" for r in range(len(tiny_bundle.roles))]
    for p in profiles:
        stats = pstats.Stats(str(p))
        assert any(name == "run_worker" for (_, _, name) in stats.stats)


def test_preemption_in_the_role_processes_gives_the_same_tokens(tmp_path, tiny_hf):
    """A KV pool of 4 pages (64 tokens) for 5 requests of up to 26 tokens each: the replica preempts and
    recomputes, and every output is still transformers'."""
    prompts = PROMPTS + [[9, 9, 9, 9], [4, 4]]
    spec = parse_spec({**tiny_spec_dict(microbatches=2), "runtime": {"kv_cache_tokens": 64, "max_seq_len": 64}})
    res = run_bundle(compile_spec(spec, tmp_path / "b").path, prompts, 18, arrivals=[0, 0, 1, 2, 3])
    assert res["outputs"] == [reference_generate(tiny_hf, p, 18) for p in prompts]
    assert any(r["preempted"] for r in res["records"][0])


def test_a_prompt_that_can_never_fit_fails_alone(tmp_path, tiny_hf):
    spec = parse_spec({**tiny_spec_dict(), "runtime": {"kv_cache_tokens": 64, "max_seq_len": 64}})
    res = run_bundle(compile_spec(spec, tmp_path / "b").path, [[1] * 70, [7, 7]], 4)
    assert res["finish_reasons"][0] == "error" and "at most 64" in res["errors"][0] and res["outputs"][0] == []
    assert res["outputs"][1] == reference_generate(tiny_hf, [7, 7], 4) and res["errors"][1] is None


def test_seeded_sampling_repeats_across_runs_and_batch_mixes(tiny_bundle):
    s = {"temperature": 1.0, "top_p": 0.9, "seed": 5, "ignore_eos": True}
    a = run_bundle(tiny_bundle.path, [PROMPTS[0]], 10, sampling=[s])["outputs"][0]
    mix = [s, {"temperature": 0.7, "seed": 1}, {}]
    b = run_bundle(tiny_bundle.path, PROMPTS, 10, sampling=mix, microbatches=2, arrivals=[3, 0, 0])["outputs"][0]
    c = run_bundle(tiny_bundle.path, [PROMPTS[0]], 10, sampling=[{**s, "seed": 6}])["outputs"][0]
    assert a == b and len(a) == 10 and a != c


def test_msc_run_samples_alike_colocated_and_as_role_processes(tiny_bundle):
    """One engine: `msc run --temperature --seed` gives the same tokens as role processes and --colocated,
    and prompt i draws with seed + i (prompts do not share one noise stream)."""
    args = ["run", str(tiny_bundle.path), "--input-ids", "5,17,42", "--input-ids", "7,7", "--max-new-tokens", "6",
            "--temperature", "0.9", "--top-p", "0.95", "--seed", "3", "--json"]
    outs = []
    for extra in ([], ["--colocated", "--device", "cpu"]):
        res = CliRunner().invoke(app, args + extra)
        assert res.exit_code == 0, res.output
        outs.append(json.loads(res.output.strip().splitlines()[-1])["outputs"])
    assert outs[0] == outs[1] and len(outs[0][0]) == 6
    assert outs[0][0][:3] != outs[0][1][1:4]  # with one shared seed these would line up by position


@pytest.mark.parametrize("kw,match", [
    ({"sampling": [{"temperature": -1}]}, "temperature must be >= 0"),
    ({"sampling": [{"best_of": 2}]}, r"unknown sampling parameters \['best_of'\]"),
    ({"sampling": [{"seed": "7"}]}, "seed must be an integer"),
    ({"sampling": [{"stop_token_ids": [2, "x"]}]}, "stop_token_ids must be token ids"),
    ({"arrivals": [-1]}, "arrivals are engine steps"),
])
def test_bad_run_options_are_refused_before_any_process_starts(tiny_bundle, kw, match, monkeypatch):
    import msc.runtime.launcher as launcher

    def no_spawn(*a, **k):
        raise AssertionError("a role process was started")

    monkeypatch.setattr(launcher, "spawn_roles", no_spawn)
    with pytest.raises(MscError, match=match):
        run_bundle(tiny_bundle.path, [[5, 17, 42]], 4, **kw)


def test_role_options_with_colocated_are_refused(tiny_bundle):
    res = CliRunner().invoke(app, ["run", str(tiny_bundle.path), "--colocated", "--trace", "t.json", "--microbatches", "2"])
    assert res.exit_code == 1 and "--microbatches, --trace apply to the role processes" in res.output


@pytest.mark.parametrize("flag,value", [("--no-prefix-caching", "0"), ("--prefix-caching", "1")])
def test_the_prefix_caching_flag_reaches_the_engine(tiny_bundle, monkeypatch, flag, value):
    """--[no-]prefix-caching is MSC_PREFIX_CACHE for this process's engine (and the role processes it starts):
    the colocated engine it builds has its prefix cache on or off, and the tokens are the same."""
    import msc.engine.build as build

    monkeypatch.setenv("MSC_PREFIX_CACHE", "")  # empty reads as unset; monkeypatch restores whatever the CLI sets
    made = []
    real = build.build_engine
    monkeypatch.setattr(build, "build_engine", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    args = ["run", str(tiny_bundle.path), "--colocated", "--device", "cpu", "--input-ids", "5,17,42",
            "--max-new-tokens", "4", "--json", flag]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert __import__("os").environ["MSC_PREFIX_CACHE"] == value
    assert (made[0].scheduler.cache.prefix is not None) == (value == "1") and out["prompt_tokens_cached"] == 0
