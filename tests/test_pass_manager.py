import pytest

from msc.errors import MscError
from msc.ir import graph_meta
from msc.pass_manager import DEFAULT_PIPELINE, PassManager
from tests.passes.helpers import run_passes


def test_unknown_pass_is_named():
    with pytest.raises(MscError, match=r"passes\[1\]: unknown pass 'shard_everything'"):
        PassManager.from_entries([{"name": "annotate_roles"}, {"name": "shard_everything"}])


def test_bad_pass_config_is_named():
    with pytest.raises(MscError, match=r"passes\[0\] \(place_experts\): config key 'strategy'"):
        PassManager.from_entries([{"name": "place_experts", "config": {"strategy": "random"}}])


def test_provenance_of_every_pass_is_recorded(toy_gm):
    gm, _ = run_passes(toy_gm, DEFAULT_PIPELINE)
    stamps = graph_meta(gm)["passes"]
    assert [s["name"] for s in stamps] == DEFAULT_PIPELINE
    assert all(s["seconds"] >= 0 and isinstance(s["config"], dict) for s in stamps)
    assert stamps[2]["config"] == {"strategy": "contiguous", "routing": None, "replicas_per_node": 1}
