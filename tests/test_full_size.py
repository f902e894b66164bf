"""Full-size configs compile on the meta device (no weights); slow, so outside the default run."""
import time
from pathlib import Path

import pytest

from msc.compiler import compile_spec
from msc.inspect import role_table
from msc.spec import load_spec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
def test_mixtral_8x22b_compiles_on_meta(tmp_path):
    t0 = time.perf_counter()
    bundle = compile_spec(load_spec(EXAMPLES / "mixtral-8x22b-meta.yaml"), tmp_path / "b")
    elapsed = time.perf_counter() - t0
    rows, _ = role_table(bundle.path)
    total = rows[0]["parameters"] + sum(r["parameters"] for r in rows if r["role"].startswith("expert"))
    assert 140e9 < total < 142e9  # Mixtral-8x22B has about 141B parameters
    assert elapsed < 120
