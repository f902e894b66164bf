"""Portable bundles: no absolute host path in a bundle; a bundle copied without its checkpoint runs with
`--checkpoint PATH`, which is checked against the bundle (first difference named) before anything starts."""
import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import msc.runtime.launcher as launcher
from msc.bundle import Bundle, resolve_checkpoint
from msc.cli import app
from msc.compiler import compile_spec
from msc.errors import MscError
from msc.runtime.worker import resolve_run_config
from msc.spec import parse_spec
from msc.tokenizer import load_tokenizer
from msc.verify import reference_generate
from tests.conftest import TINY

PROMPTS = [[5, 17, 42, 100, 3], [7, 7]]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, tiny_bundle):
    """(root, checkpoint folder, bundle): the tiny Mixtral's checkpoint (with a tokenizer) in root/ckpt and a
    bundle compiled from it at root/bundles/b."""
    root = tmp_path_factory.mktemp("portable")
    ck = root / "ckpt"
    shutil.copytree(tiny_bundle.checkpoint_dir(), ck)
    for f in (tiny_bundle.path / "tokenizer").iterdir():  # a checkpoint that brings its tokenizer
        shutil.copy(f, ck / f.name)
    spec = parse_spec({"model": {"path": str(ck), "dtype": "float32"}, "device": "cpu", "plan": {"experts": {"nodes": 2}}})
    return root, ck, compile_spec(spec, root / "bundles" / "b")


@pytest.fixture
def copied(compiled, tmp_path):
    """(bundle copied to another folder, its checkpoint moved to a new name): the recorded relative path breaks."""
    _, ck, bundle = compiled
    dest = tmp_path / "elsewhere" / "b"
    shutil.copytree(bundle.path, dest)
    moved = tmp_path / "moved-ckpt"
    shutil.copytree(ck, moved)
    assert not (dest / bundle.manifest["model"]["checkpoint"]).exists()
    return Bundle.open(dest), moved


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def test_the_bundle_records_no_absolute_path(compiled):
    root, ck, bundle = compiled
    prefixes = {str(root), str(root.resolve())}
    docs = {"manifest.json": json.loads((bundle.path / "manifest.json").read_text()),
            "spec.yaml": yaml.safe_load((bundle.path / "spec.yaml").read_text()),
            "checkpoint.json": json.loads((bundle.path / "checkpoint.json").read_text())}
    for name, doc in docs.items():
        bad = [s for s in _strings(doc) if any(p in s for p in prefixes)]
        assert not bad, f"{name} holds host paths {bad[:3]}"
    m = bundle.manifest
    assert not m["model"]["checkpoint"].startswith("/")
    assert (bundle.path / m["model"]["checkpoint"]).resolve() == ck.resolve()
    assert (bundle.path / m["model"]["tokenizer"]).resolve() == ck.resolve()
    assert (bundle.path / docs["spec.yaml"]["model"]["path"]).resolve() == ck.resolve()
    assert m["spec"]["model"]["path"] == docs["spec.yaml"]["model"]["path"]


def test_the_bundle_lists_the_checkpoint_tensors_it_reads(compiled):
    _, ck, bundle = compiled
    expected = bundle.checkpoint_expectations()
    state = load_file(str(ck / "model.safetensors"))  # the safetensors library's own reading of the file
    # every tensor of this model is read by some role (the colocated program reads them all)
    assert set(expected["tensors"]) == set(state)
    for key, (dtype, shape) in expected["tensors"].items():
        assert shape == list(state[key].shape) and dtype == "float32", key
    assert expected["config"]["model_type"] == "mixtral"
    assert expected["config"]["intermediate_size"] == TINY["intermediate_size"]


def test_a_bundle_moved_with_its_checkpoint_still_finds_it(compiled, tmp_path):
    root, _, bundle = compiled
    shutil.copytree(root, tmp_path / "moved", ignore=shutil.ignore_patterns(".*"))
    moved = Bundle.open(tmp_path / "moved" / "bundles" / "b")
    assert resolve_checkpoint(moved, None) == str((tmp_path / "moved" / "ckpt").resolve())


def test_a_copied_bundle_without_its_checkpoint_asks_for_one(copied, monkeypatch):
    bundle, _ = copied

    def no_spawn(*a, **k):
        raise AssertionError("a role process was started")

    monkeypatch.setattr(launcher, "spawn_roles", no_spawn)
    res = CliRunner().invoke(app, ["run", str(bundle.path), "--input-ids", "5,17", "--max-new-tokens", "2"])
    assert res.exit_code == 1
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "pass --checkpoint PATH" in lines[0], res.output
    with pytest.raises(MscError, match="pass --checkpoint PATH"):
        load_tokenizer(bundle.path, bundle.manifest)


def test_msc_run_with_checkpoint_gives_the_reference_tokens(copied, tiny_hf):
    bundle, moved = copied
    args = ["run", str(bundle.path), "--checkpoint", str(moved), "--max-new-tokens", "6", "--json"]
    for p in PROMPTS:
        args += ["--input-ids", ",".join(map(str, p))]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["outputs"] == [reference_generate(tiny_hf, p, 6) for p in PROMPTS]


def test_msc_run_colocated_with_checkpoint(copied, tiny_hf):
    bundle, moved = copied
    res = CliRunner().invoke(app, ["run", str(bundle.path), "--colocated", "--device", "cpu", "--checkpoint", str(moved),
                                   "--input-ids", "5,17,42,100,3", "--max-new-tokens", "4", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["outputs"] == [reference_generate(tiny_hf, PROMPTS[0], 4)]


def test_serve_with_checkpoint_answers_with_the_reference_tokens(copied, tiny_hf):
    from transformers import AutoTokenizer

    from msc.runtime.serving import ServingEngine

    bundle, moved = copied
    with pytest.raises(MscError, match="pass --checkpoint PATH"):
        ServingEngine(bundle.path)
    engine = ServingEngine(bundle.path, checkpoint=moved).start(timeout_s=180)
    try:
        assert engine.checkpoint == str(moved.resolve())
        assert engine.generate([PROMPTS[0]], 5) == [reference_generate(tiny_hf, PROMPTS[0], 5)]
    finally:
        engine.close()
    # the tokenizer was the checkpoint's: it follows --checkpoint
    tok = load_tokenizer(bundle.path, bundle.manifest, engine.checkpoint)
    assert tok("Hello world").input_ids == AutoTokenizer.from_pretrained(str(moved))("Hello world").input_ids


def _rewrite(src, dest, change):
    """A copy of checkpoint folder src at dest with its tensors passed through change(dict)."""
    shutil.copytree(src, dest)
    tensors = load_file(str(dest / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def _expert_key(state) -> str:
    return next(k for k in state if k.startswith("model.layers.1.") and ".experts." in k)


def test_a_checkpoint_of_another_size_is_refused_naming_the_first_difference(compiled, tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM

    _, _, bundle = compiled
    cfg = {**TINY, "intermediate_size": 96}
    other = tmp_path / "other"
    AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).save_pretrained(other)
    monkeypatch.setattr(launcher, "spawn_roles", lambda *a, **k: pytest.fail("a role process was started"))
    res = CliRunner().invoke(app, ["run", str(bundle.path), "--checkpoint", str(other), "--input-ids", "5"])
    assert res.exit_code == 1
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1, res.output
    assert f"checkpoint {other.resolve()}: config.json has intermediate_size 96, the bundle expects 128" in lines[0]


def test_a_checkpoint_with_other_tensors_is_refused(compiled, tmp_path):
    _, ck, bundle = compiled
    state = load_file(str(ck / "model.safetensors"))
    key = _expert_key(state)
    want = list(state[key].shape)

    def grow(t):
        t[key] = torch.zeros(want[0] * 2, *want[1:])

    d = _rewrite(ck, tmp_path / "shape", grow)
    with pytest.raises(MscError, match=rf"tensor {key} has shape \[{want[0] * 2}, .*\], the bundle expects \[{want[0]}, "):
        resolve_checkpoint(bundle, d)

    def half(t):
        t[key] = t[key].half()

    d = _rewrite(ck, tmp_path / "dtype", half)
    with pytest.raises(MscError, match=rf"tensor {key} has dtype float16, the bundle expects float32"):
        resolve_checkpoint(bundle, d)

    d = _rewrite(ck, tmp_path / "missing", lambda t: t.pop(key))
    with pytest.raises(MscError, match=rf"has no tensor {key}, which the bundle reads"):
        resolve_checkpoint(bundle, d)


def test_bad_checkpoint_folders_are_refused_in_one_line(compiled, tmp_path):
    _, ck, bundle = compiled
    with pytest.raises(MscError, match=r"checkpoint .*nowhere does not exist"):
        resolve_checkpoint(bundle, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    shutil.copy(ck / "config.json", tmp_path / "empty" / "config.json")
    with pytest.raises(MscError, match="no model.safetensors or model.safetensors.index.json"):
        resolve_checkpoint(bundle, tmp_path / "empty")
    shutil.copytree(ck, tmp_path / "noconfig")
    (tmp_path / "noconfig" / "config.json").unlink()
    with pytest.raises(MscError, match="has no config.json; the bundle expects a mixtral checkpoint"):
        resolve_checkpoint(bundle, tmp_path / "noconfig")
    other = json.loads((ck / "config.json").read_text()) | {"model_type": "qwen2_moe"}
    shutil.copytree(ck, tmp_path / "qwen")
    (tmp_path / "qwen" / "config.json").write_text(json.dumps(other))
    with pytest.raises(MscError, match="config.json has model_type 'qwen2_moe', the bundle expects 'mixtral'"):
        resolve_checkpoint(bundle, tmp_path / "qwen")


def test_the_run_config_takes_a_checkpoint(compiled):
    _, ck, bundle = compiled
    assert resolve_run_config({"checkpoint": str(ck)}, bundle.manifest)["checkpoint"] == str(ck)
    with pytest.raises(MscError, match="exclude each other"):
        resolve_run_config({"checkpoint": str(ck), "random_weights": True}, bundle.manifest)
    with pytest.raises(MscError, match="checkpoint must be the path of a checkpoint folder"):
        resolve_run_config({"checkpoint": 3}, bundle.manifest)
