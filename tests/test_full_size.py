"""Full-size configs compile on the meta device (no weights) in seconds; slow, so outside the default run.

Run with `python -m pytest -m slow tests/test_full_size.py`. Each bundle's roles together hold exactly the
parameters of the Hugging Face model built on the meta device from the same config (an independent count).
"""
import time
from pathlib import Path

import pytest
import torch
import yaml

from msc.compiler import compile_spec
from msc.inspect import role_table
from msc.spec import load_spec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _hf_parameter_count(spec_path: Path) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(yaml.safe_load(spec_path.read_text())["model"]["config"])
    cfg = AutoConfig.for_model(config.pop("model_type"), **config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = [t for k, t in model.state_dict().items() if k not in params]  # persistent buffers (router bias)
    return sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in buffers)


@pytest.mark.slow
@pytest.mark.parametrize("name, approx", [
    ("mixtral-8x22b-meta", 141e9), ("dbrx-meta", 132e9), ("deepseek-v3-meta", 671e9), ("qwen3-moe-235b-meta", 235e9),
])
def test_full_size_config_compiles_on_meta_in_seconds(tmp_path, name, approx):
    t0 = time.perf_counter()
    bundle = compile_spec(load_spec(EXAMPLES / f"{name}.yaml"), tmp_path / "b")
    elapsed = time.perf_counter() - t0
    rows, manifest = role_table(bundle.path)
    attention = next(r for r in rows if r["role"] == "attention.0")
    total = attention["parameters"] + sum(r["parameters"] for r in rows if r["role"].startswith("expert"))
    assert total == _hf_parameter_count(EXAMPLES / f"{name}.yaml")
    assert abs(total - approx) / approx < 0.03
    assert manifest["captured"]["parameters"] == total
    assert elapsed < 30  # the closing note quotes the measured wall times (a few seconds each)
