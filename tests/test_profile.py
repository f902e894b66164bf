"""msc profile: the fit, the errors without a GPU, and the H200 profile it wrote feeding the planner."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from msc.errors import MscError

ROOT = Path(__file__).resolve().parents[1]


def test_fit_matches_numpy_least_squares():
    from msc.profile import _fit

    rng = np.random.default_rng(0)
    xs = [16, 32, 64, 128, 256]
    ys = [3e-6 * x + 2e-4 + rng.normal(0, 1e-6) for x in xs]
    slope, icpt = _fit(xs, ys)
    ref = np.polyfit(xs, ys, 1)
    assert slope == pytest.approx(ref[0], rel=1e-9) and icpt == pytest.approx(ref[1], rel=1e-9)
    assert _fit([1, 2, 3], [3.0, 2.0, 1.0])[0] == 0.0  # a falling fit is clamped (profile fields are >= 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given on a machine without a GPU")
def test_no_gpu_is_a_clear_error():
    from msc.profile import run_profile
    from msc.spec import load_spec

    with pytest.raises(MscError, match="measures a GPU"):
        run_profile(load_spec(ROOT / "examples/mixtral-8x7b-h200.yaml"), batches=[16], contexts=[100, 200],
                    expert_tokens=[16])


def test_h200_profile_feeds_the_planner(tmp_path):
    """The profile measured on the H200 is valid planner input and changes the planner's colocated step to
    what was measured (docs/results/profile_mixtral_8x7b_h200.report.json), within 15 %."""
    import json

    from msc.planner.cost import cost_of_spec
    from msc.planner.hardware import get_gpu, load_catalogue
    from msc.planner.perf import Efficiency, colocated_step, load_profile
    from msc.planner.search import side_of
    from msc.spec import load_spec

    profile = load_profile(ROOT / "docs/results/profile_mixtral_8x7b_h200.json")
    report = json.loads((ROOT / "docs/results/profile_mixtral_8x7b_h200.report.json").read_text())
    cost, _ = cost_of_spec(load_spec(ROOT / "examples/mixtral-8x7b-h200.yaml"))
    side = side_of(get_gpu("H200", load_catalogue()), 1)
    for row in report["steps"]:
        predicted = colocated_step(cost, row["batch"], row["context"], side, Efficiency(), profile)
        assert abs(predicted / row["measured_s"] - 1) < 0.15, row
