"""Every bad input gets one clear message and leaves nothing behind in the output directory."""

import pytest
import yaml
from typer.testing import CliRunner

from msc.cli import app
from tests.conftest import tiny_spec_dict

runner = CliRunner()


def _compile(tmp_path, spec_text: str):
    spec = tmp_path / "model.yaml"
    spec.write_text(spec_text)
    out = tmp_path / "out" / "bundle"
    res = runner.invoke(app, ["compile", str(spec), "-o", str(out)])
    leftovers = list((tmp_path / "out").iterdir()) if (tmp_path / "out").exists() else []
    return res, out, leftovers


def _msg(res) -> str:
    return " ".join((res.stderr or res.output).split())


CASES = {
    "unknown key": (
        yaml.safe_dump(tiny_spec_dict()).replace("nodes: 2", "nodez: 2"),
        ["key 'plan.experts.nodez'", "unknown key", "expected one of: nodes, tp", "model.yaml:"],
    ),
    "wrong type": (
        yaml.safe_dump({**tiny_spec_dict(), "plan": {"microbatches": "three"}}),
        ["key 'plan.microbatches'", "valid integer"],
    ),
    "missing required": (
        yaml.safe_dump({"device": "cpu"}),
        ["key 'model'", "required key is missing"],
    ),
    "checkpoint path does not exist": (
        yaml.safe_dump({"model": {"path": "/nonexistent/ckpt"}}),
        ["model.path", "does not exist", "/nonexistent/ckpt"],
    ),
    "model without MoE layers": (
        yaml.safe_dump({"model": {"config": {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1,
                                              "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 128}}}),
        ["'llama' has no MoE layers"],
    ),
    "more expert nodes than experts": (
        yaml.safe_dump({**tiny_spec_dict(), "plan": {"experts": {"nodes": 9}}}),
        ["plan.experts.nodes = 9", "4 experts"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_spec_gives_one_clear_message_and_writes_nothing(tmp_path, case):
    text, expected = CASES[case]
    res, out, leftovers = _compile(tmp_path, text)
    assert res.exit_code != 0
    msg = _msg(res)
    for part in expected:
        assert part in msg, (part, msg)
    assert "Traceback" not in msg
    assert not out.exists() and leftovers == []


def test_unknown_key_names_the_line(tmp_path):
    text = "model:\n  config: {model_type: mixtral}\n  sed: 3\n"
    res, _, _ = _compile(tmp_path, text)
    assert "model.yaml:3: key 'model.sed'" in _msg(res)


def test_existing_non_bundle_directory_is_not_overwritten(tmp_path):
    spec = tmp_path / "model.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec_dict()))
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    res = runner.invoke(app, ["compile", str(spec), "-o", str(precious)])
    assert res.exit_code != 0 and "refusing to overwrite" in _msg(res)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_bad_input_ids_and_meta_bundle_run(tmp_path, tiny_bundle):
    res = runner.invoke(app, ["run", str(tiny_bundle.path), "--input-ids", "5,x"])
    assert res.exit_code != 0 and "comma-separated integer" in _msg(res)
    res = runner.invoke(app, ["run", str(tiny_bundle.path), "--input-ids", "5,999"])
    assert res.exit_code != 0 and "outside the model's vocabulary" in _msg(res)
    spec = tmp_path / "meta.yaml"
    spec.write_text(yaml.safe_dump({**tiny_spec_dict(), "device": "meta"}))
    assert runner.invoke(app, ["compile", str(spec), "-o", str(tmp_path / "m")]).exit_code == 0
    res = runner.invoke(app, ["run", str(tmp_path / "m"), "--input-ids", "1,2"])
    assert res.exit_code != 0 and "has no weights" in _msg(res)


def _alias_bomb() -> str:
    """Under 400 bytes of YAML under a valid key (`planner:` takes any mapping) expanding to 9**9 values."""
    lines = ["model:", "  config: {model_type: mixtral}", "planner:", "  l0: &l0 [" + ", ".join(["lol"] * 9) + "]"]
    lines += [f"  l{n}: &l{n} [" + ", ".join([f"*l{n - 1}"] * 9) + "]" for n in range(1, 9)]
    return "\n".join(lines) + "\n"


SPEC_INPUT_CASES = {
    "alias bomb": (_alias_bomb(), "model.yaml:8: the YAML aliases here expand to more than"),
    "binary file": (b"\x7fELF\x02\x01\x01\x00\x00\x00", "model.yaml:1: the spec file holds a NUL byte"),
    "not utf-8": (b"model:\n  config: {model_type: mixtral\xe9}\n", "model.yaml:2: the spec file is not UTF-8 text"),
    "deep nesting": ("model:\n  config: {model_type: mixtral}\nplanner: " + "[" * 50_000 + "\n", "nests deeper than"),
    "duplicate key": (yaml.safe_dump(tiny_spec_dict()) + "device: meta\n", "duplicate key 'device' (first at line"),
    "microbatches true": (yaml.safe_dump({**tiny_spec_dict(), "plan": {"microbatches": True}}),
                          "key 'plan.microbatches': Input should be a valid integer (got True)"),
    "microbatches string": (yaml.safe_dump({**tiny_spec_dict(), "plan": {"microbatches": "8"}}),
                            "key 'plan.microbatches': Input should be a valid integer (got '8')"),
    "top-k above experts": (yaml.safe_dump({"model": {"config": {**tiny_spec_dict()["model"]["config"], "num_experts_per_tok": 5}}}),
                            "model.config.num_experts_per_tok: top-k 5 is larger than the expert count 4"),
    "negative vocab": (yaml.safe_dump({"model": {"config": {**tiny_spec_dict()["model"]["config"], "vocab_size": -1}}}),
                       "model.config.vocab_size: expected a positive integer, got -1"),
}


@pytest.mark.parametrize("case", sorted(SPEC_INPUT_CASES))
def test_bad_spec_input_is_one_line_through_the_cli(tmp_path, case):
    import time

    content, expected = SPEC_INPUT_CASES[case]
    spec = tmp_path / "model.yaml"
    spec.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "out" / "bundle"
    t0 = time.perf_counter()
    res = runner.invoke(app, ["compile", str(spec), "-o", str(out)])
    assert time.perf_counter() - t0 < 5.0
    assert res.exit_code == 1 and res.exception is None or isinstance(res.exception, SystemExit)
    text = res.stderr.strip()
    assert text.startswith("error: ") and "\n" not in text and "Traceback" not in text, text
    assert expected in text, (expected, text)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
