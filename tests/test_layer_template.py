"""Layer-template capture gives the same graph as exporting every layer, on every tested family."""
from __future__ import annotations

import pytest
import torch.fx as fx
from transformers import AutoConfig

from msc.capture import capture
from msc.ir import graph_meta
from msc.layer_template import choose_representatives
from msc.models.registry import adapter_for
from tests.models.families import FAMILIES, GENERIC_FAMILIES, RUNNING_STATE_FAMILIES


def canonical(gm: fx.GraphModule) -> list[tuple]:
    """The graph's computation with node names replaced by their order and weights by their names."""
    ids: dict[fx.Node, object] = {}
    out = []
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            ids[n] = ("weight", n.target)
            continue
        ids[n] = len(out)
        out.append((n.op, str(n.target), str(fx.node.map_arg((n.args, n.kwargs), lambda x: ids[x]))))
    return out


def _deeper(config: dict) -> dict:
    """The family's tiny config with more layers, so some layers are copied rather than traced."""
    c = dict(config)
    if c["model_type"] == "dbrx":
        c["n_layers"] = 5
    elif c["model_type"] in ("deepseek_v3", "glm4_moe"):  # 3 dense layers: traced 0, 1, 3 (not contiguous)
        c["num_hidden_layers"], c["first_k_dense_replace"] = 6, 3
    elif "layer_types" in c:
        c["layer_types"] = c["layer_types"] * 3
        c["num_hidden_layers"] = len(c["layer_types"])
    else:
        c["num_hidden_layers"] = c["num_hidden_layers"] + 3
    return c


# NOTE: DeepSeek-V2's MoE layers return two values where its dense layer returns one, which the layer template
# does not cover: its capture falls back to a full export (correct, slower); strict, so a fix shows up here
_FALLS_BACK = {"deepseek_v2": "MoE and dense layer blocks have different numbers of outputs"}


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.xfail(strict=True, reason=_FALLS_BACK[f]))
                                    if f in _FALLS_BACK else f for f in sorted({**FAMILIES, **GENERIC_FAMILIES,
                                                                                **RUNNING_STATE_FAMILIES})])
def test_template_capture_equals_full_capture(family):
    c = _deeper({**FAMILIES, **GENERIC_FAMILIES, **RUNNING_STATE_FAMILIES}[family])
    model_type = c.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **c)
    by_template = capture(cfg, adapter_for(model_type, cfg), template=True)
    full = capture(cfg, adapter_for(model_type, cfg), template=False)
    info = graph_meta(by_template.gm)["capture"]["template"]
    assert info is not None, "template capture fell back to a full export"
    assert len(info["traced_layers"]) < cfg.num_hidden_layers
    if model_type == "deepseek_v3":
        assert info["traced_layers"] == [0, 1, 3]
    assert canonical(by_template.gm) == canonical(full.gm)


def test_representatives_chain_every_kind_to_a_predecessor():
    # DeepSeek-like: 3 dense then MoE; GPT-OSS-like: alternating kinds
    traced, rep_of = choose_representatives(["d", "d", "d", "m", "m", "m"])
    assert traced == [0, 1, 3] and rep_of == {0: 0, 1: 1, 2: 1, 3: 3, 4: 3, 5: 3}
    traced, rep_of = choose_representatives(["s", "f", "s", "f"])
    assert traced == [0, 1, 2] and rep_of == {0: 0, 1: 1, 2: 2, 3: 1}
    traced, rep_of = choose_representatives(["x", "y", "y"])  # layer 0's kind occurs once
    assert traced == [0, 1] and rep_of == {0: 0, 1: 1, 2: 1}
