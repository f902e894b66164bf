"""Random weights made at load time (msc.random_weights): a meta-compiled bundle runs, and every program
holds the same numbers, so a disaggregated run and a colocated one give the same tokens."""
from __future__ import annotations

import pytest
import torch

from msc.compiler import compile_spec
from msc.ir import fetch_attr
from msc.random_weights import INIT_STD
from msc.runtime.launcher import run_bundle
from msc.spec import parse_spec
from tests.conftest import tiny_spec_dict


@pytest.fixture(scope="module")
def meta_bundle(tmp_path_factory):
    d = tiny_spec_dict()
    d["device"] = "meta"
    return compile_spec(parse_spec(d), tmp_path_factory.mktemp("meta") / "b")


def test_expert_slices_equal_the_colocated_rows(meta_bundle):
    colo = meta_bundle.load_program("colocated", "cpu", random_weights=True)
    for j, (lo, hi) in enumerate([(0, 2), (2, 4)]):
        node = meta_bundle.load_program(f"expert.{j}", "cpu", random_weights=True)
        for target in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
            assert torch.equal(fetch_attr(node, target), fetch_attr(colo, target)[lo:hi])
    w = fetch_attr(colo, "model.layers.0.self_attn.q_proj.weight")
    assert abs(w.std().item() - INIT_STD) < 0.002  # transformers' initialisation scale
    assert torch.equal(fetch_attr(colo, "model.norm.weight"), torch.ones(64))


def test_meta_bundle_runs_with_random_weights_disaggregated_and_colocated_alike(meta_bundle):
    from msc.runtime.gpu_engine import ColocatedEngine

    prompts = [[5, 9, 14], [1, 2, 3, 4, 5]]
    res = run_bundle(meta_bundle.path, prompts, 5, random_weights=True, device="cpu")
    engine = ColocatedEngine(meta_bundle.load_program("colocated", "cpu", random_weights=True), 2, "cpu", max_batch=2,
                             max_seq_len=16, page_size=4, cuda_graphs=False)
    assert res["outputs"] == engine.generate(prompts, 5).tokens


def test_meta_bundle_without_random_weights_is_refused(meta_bundle):
    from msc.errors import MscError

    with pytest.raises(MscError, match="has no weights.*--random-weights"):
        run_bundle(meta_bundle.path, [[1, 2]], 2)
