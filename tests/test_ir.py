import json

import pytest
import torch

from msc.errors import MscError
from msc.ir import graph_from_json, graph_to_json, resolve_target


def test_program_json_round_trip_gives_the_same_code(tiny_bundle):
    data = json.loads((tiny_bundle.path / "programs" / "attention.json").read_text())
    g = graph_from_json(data)
    again = graph_to_json(g)
    assert again == data
    assert any(n["args"] and "$device" in json.dumps(n["args"]) for n in data["nodes"]), "devices are stored as markers"


def test_loaded_device_markers_bind_to_the_role_device(tiny_bundle):
    data = json.loads((tiny_bundle.path / "programs" / "attention.json").read_text())
    g = graph_from_json(data, "cpu")
    devices = [a for n in g.nodes for a in n.args if isinstance(a, torch.device)]
    assert devices and all(d == torch.device("cpu") for d in devices)


def test_unknown_target_is_rejected():
    with pytest.raises(MscError, match="'os.system', which is not an allowed call target"):
        resolve_target("os.system")
