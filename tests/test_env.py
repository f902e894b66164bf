"""msc/env.py: every MSC_* variable the code reads is declared (and docs/env.md is the same table), values are
parsed strictly, and `msc env` shows them without printing a secret."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from msc import env
from msc.cli import app
from msc.errors import MscError

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("msc", "backends", "passes", "models") for p in (ROOT / d).rglob("*.py")]


def _python_names(tree: ast.AST) -> set[str]:
    """Identifiers of the module (MSC_OPS is a dict, not an environment variable)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.alias):
            names.add(node.asname or node.name)
    return names


def test_every_variable_the_code_names_is_declared():
    used: dict[str, str] = {}
    identifiers: set[str] = set()
    for path in SOURCES:
        text = path.read_text()
        identifiers |= _python_names(ast.parse(text))
        for name in re.findall(r"MSC_[A-Z0-9_]*[A-Z0-9]", text):
            used.setdefault(name, str(path.relative_to(ROOT)))
    undeclared = {n: where for n, where in used.items() if n not in identifiers and n not in env.VARS}
    assert not undeclared, f"read but not declared in msc/env.py: {undeclared}"
    unused = set(env.VARS) - set(used)
    assert not unused, f"declared in msc/env.py but named nowhere in the code: {unused}"
    assert len(used) - len(identifiers & set(used)) >= 20  # the scan found the variables at all


def test_docs_table_is_the_declared_table():
    page = (ROOT / "docs" / "env.md").read_text()
    assert env.markdown_table() in page, "docs/env.md is stale: regenerate its table from msc.env.markdown_table()"


@pytest.mark.parametrize("text, expected", [("1", True), ("ON", True), (" true ", True), ("yes", True),
                                            ("0", False), ("off", False), ("False", False), ("no", False)])
def test_switch_words(monkeypatch, text, expected):
    monkeypatch.setenv("MSC_FUSE", text)
    assert env.switch("MSC_FUSE") is expected


def test_unset_values_fall_back_to_the_declared_default(monkeypatch):
    for name in ("MSC_FUSE", "MSC_OVERLAP", "MSC_STAGE_GRAPHS", "MSC_SHM_SPIN_US", "MSC_MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert env.switch("MSC_FUSE") is True
    assert env.switch("MSC_OVERLAP") is None  # no default: the engine decides by device
    assert env.choice("MSC_STAGE_GRAPHS") == "off"
    assert env.number("MSC_SHM_SPIN_US") is None
    assert env.integer("MSC_MASTER_PORT") == 29511
    monkeypatch.setenv("MSC_FUSE", "")  # set but empty reads as unset
    assert env.switch("MSC_FUSE") is True


@pytest.mark.parametrize("name, text, message", [
    ("MSC_FUSE", "2", r"MSC_FUSE='2': expected 1 / on / true / yes or 0 / off / false / no"),
    ("MSC_STAGE_GRAPHS", "maybe", r"MSC_STAGE_GRAPHS='maybe': expected one of off, on, emulate"),
    ("MSC_DEVICE_EXCHANGE", "yes", r"MSC_DEVICE_EXCHANGE='yes': expected one of auto, on, off"),
    ("MSC_SHM_SPIN_US", "fast", r"MSC_SHM_SPIN_US='fast': expected a number"),
    ("MSC_MASTER_PORT", "29.5", r"MSC_MASTER_PORT='29.5': expected a whole number"),
])
def test_a_value_msc_does_not_take_is_refused_by_name(monkeypatch, name, text, message):
    monkeypatch.setenv(name, text)
    reader = {"switch": env.switch, "choice": env.choice, "number": env.number, "int": env.integer}
    with pytest.raises(MscError, match=message):
        reader[env.VARS[name].kind](name)


def test_an_undeclared_name_is_a_programming_error():
    with pytest.raises(MscError, match="MSC_NOT_A_THING is not one of msc's environment variables"):
        env.switch("MSC_NOT_A_THING")


def test_readers_take_effect_where_msc_reads_them(monkeypatch, tmp_path):
    """The places that used to parse their own variable now go through msc.env (a refused value surfaces there)."""
    from msc.runtime import device_exchange

    monkeypatch.setenv("MSC_CACHE_DIR", str(tmp_path))
    assert env.cache_dir() == tmp_path
    monkeypatch.setenv("MSC_DEVICE_EXCHANGE", "sometimes")
    with pytest.raises(MscError, match="MSC_DEVICE_EXCHANGE='sometimes'"):
        device_exchange.mode()
    monkeypatch.setenv("MSC_DEVICE_EXCHANGE", "OFF")
    assert device_exchange.mode() == "off"


def test_msc_env_lists_values_and_fails_on_a_bad_one(monkeypatch):
    cli = CliRunner()
    monkeypatch.setenv("MSC_API_KEY", "hunter2-secret")
    monkeypatch.setenv("MSC_STATE_PREFILL", "loop")
    monkeypatch.delenv("MSC_OVERLAP", raising=False)
    res = cli.invoke(app, ["env"], terminal_width=240)
    assert res.exit_code == 0, res.output
    assert "hunter2-secret" not in res.output and "(set)" in res.output
    assert re.search(r"MSC_STATE_PREFILL\s*│\s*loop", res.output)
    assert "MSC_PARENT_PID" not in res.output  # msc's own: only with --all
    assert "MSC_PARENT_PID" in cli.invoke(app, ["env", "--all"], terminal_width=240).output
    monkeypatch.setenv("MSC_OVERLAP", "perhaps")
    res = cli.invoke(app, ["env"], terminal_width=240)
    assert res.exit_code == 1
    assert "MSC_OVERLAP='perhaps': expected 1 / on / true / yes or 0 / off / false / no" in res.output
