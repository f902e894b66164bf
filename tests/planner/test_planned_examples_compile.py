"""`msc plan` of each example cluster, then `msc compile` of the plan it writes (tp plans included)."""
from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from msc.bundle import Bundle
from msc.cli import app

EXAMPLES = ["plan-dbrx-a100.yaml", "plan-dbrx-h20-l40s.yaml", "plan-mixtral-8x22b-a100.yaml", "plan-mixtral-8x22b-h20-l40s.yaml"]
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES)
def test_the_planned_spec_compiles(tmp_path, example):
    planned = tmp_path / "planned.yaml"
    r = CliRunner().invoke(app, ["plan", str(ROOT / "examples" / example), "-o", str(planned)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["compile", str(planned), "-o", str(tmp_path / "bundle")])
    assert r.exit_code == 0, r.output
    m = Bundle.open(tmp_path / "bundle").manifest
    plan = m["plan"]
    tp, etp = plan["attention"]["tp"], plan["experts"]["tp"]
    kinds = [role["kind"] for role in m["roles"]]
    assert kinds.count("attention_tp") == plan["attention"]["replicas"] * (tp - 1)
    assert kinds.count("expert_tp") == plan["experts"]["nodes"] * (etp - 1)
