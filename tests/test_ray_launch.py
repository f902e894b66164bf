"""`msc launch --engine ray` (issue 23): a local Ray cluster of two nodes, each carrying the custom resource of
one GPU type (msc_pool_H20 on the head, msc_pool_L40S on the second), runs a heterogeneous plan's bundle with
transformers' outputs, attention on the H20 node and experts on the L40S node; a killed actor or a crashed
role stops the launch with a message naming the role, its rank and its node, and leaves no role process;
a killed launcher leaves no role process either; a cluster that lacks a pool is refused before anything is
placed, with what is missing listed."""
from __future__ import annotations

import os
import select
import subprocess
import sys

import pytest

ray = pytest.importorskip("ray", reason="the Ray engine's tests need Ray (pip install 'msc[ray]')")

from ray.cluster_utils import Cluster  # noqa: E402

from msc.errors import MscError  # noqa: E402
from msc.runtime import ray_launch  # noqa: E402
from msc.runtime.ray_launch import run_bundle_on_ray  # noqa: E402
from msc.runtime.worker import FAULT_AFTER, FAULT_ROLE  # noqa: E402
from msc.verify import reference_generate  # noqa: E402
from tests.conftest import tiny_spec_dict  # noqa: E402
from tests.test_reliability import wait_until, worker_pids  # noqa: E402

PROMPTS = [[5, 17, 42, 7], [100, 3, 9]]
NEW = 6


def hetero_spec(experts_gpu: str) -> dict:
    """The tiny Mixtral with attention on an H20 pool and experts on `experts_gpu` (plan fields fixed, so the
    planner has nothing left to choose)."""
    d = tiny_spec_dict(attention={"replicas": 1}, microbatches=1, batch_size=4)
    d["hardware"] = {"attention": {"gpu": "H20", "count": 1, "per_node": 1},
                     "experts": {"gpu": experts_gpu, "count": 2, "per_node": 2}}
    d["workload"] = {"input_len": 8, "output_len": 8, "tpot_ms": 50}
    return d


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """{experts GPU type: compiled bundle}: L40S (the cluster has it) and H800 (it has not)."""
    from msc.compiler import compile_spec
    from msc.spec import parse_spec

    root = tmp_path_factory.mktemp("ray-bundles")
    old = os.environ.get("MSC_CACHE_DIR")
    os.environ["MSC_CACHE_DIR"] = str(root / "cache")  # the planner's cost cache stays out of ~/.cache
    try:
        return {gpu: compile_spec(parse_spec(hetero_spec(gpu)), root / gpu) for gpu in ("L40S", "H800")}
    finally:
        if old is None:
            os.environ.pop("MSC_CACHE_DIR", None)
        else:
            os.environ["MSC_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes on this machine standing for two GPU types; this process is connected to it."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"msc_pool_H20": 1},
                                                      "include_dashboard": False})
    try:
        c.add_node(num_cpus=2, resources={"msc_pool_L40S": 2})
        c.wait_for_nodes(timeout=60)
        ray.init(address=c.address, log_to_driver=False, include_dashboard=False)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def node_with(resource: str) -> str:
    return next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get(resource))


def no_placement_groups_left() -> bool:
    return all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())


def test_resource_mapping_follows_the_plans_pools(bundles):
    m = bundles["L40S"].manifest
    assert ray_launch.side_resources(m, "cpu") == {"attention": {"CPU": 1.0, "msc_pool_H20": 1.0},
                                                   "expert": {"CPU": 1.0, "msc_pool_L40S": 1.0}}
    assert ray_launch.side_resources(m, "cuda") == {"attention": {"GPU": 1.0, "accelerator_type:H20": 0.001},
                                                    "expert": {"GPU": 1.0, "accelerator_type:L40S": 0.001}}
    over = ray_launch.parse_resources('expert={"CPU": 2, "big_memory": 1}')
    assert ray_launch.side_resources(m, "cpu", over)["expert"] == {"CPU": 2.0, "big_memory": 1.0}
    with pytest.raises(MscError, match="attention=JSON,expert=JSON"):
        ray_launch.parse_resources('experts={"CPU": 1}')


def test_heterogeneous_bundle_runs_on_its_pools_with_transformers_outputs(cluster, bundles):
    import torch
    from transformers import AutoModelForCausalLM

    bundle = bundles["L40S"]
    hf = AutoModelForCausalLM.from_pretrained(str(bundle.checkpoint_dir()), dtype=torch.float32).eval()
    res = run_bundle_on_ray(bundle.path, PROMPTS, NEW, address=cluster.address, timeout_s=120)
    assert res["outputs"] == [reference_generate(hf, p, NEW) for p in PROMPTS]
    assert res["finish_reasons"] == ["length", "length"] and res["errors"] == [None, None]
    where = {p["role"]: p["node_id"] for p in res["placement"]}
    h20, l40s = node_with("msc_pool_H20"), node_with("msc_pool_L40S")
    assert where == {"attention.0": h20, "expert.0": l40s, "expert.1": l40s}
    assert res["transport"] == "tcp"  # the roles span two nodes
    assert not worker_pids(str(bundle.path)) and no_placement_groups_left()


def test_a_killed_actor_stops_the_launch_naming_its_role_and_node(cluster, bundles):
    bundle = bundles["L40S"]
    seen: dict = {}

    def kill_expert(placed: list[dict]) -> None:
        victim = next(p for p in placed if p["role"] == "expert.1")
        seen.update(victim)
        ray.kill(victim["actor"], no_restart=True)

    with pytest.raises(MscError) as err:
        run_bundle_on_ray(bundle.path, PROMPTS, 200, address=cluster.address, timeout_s=120,
                          sampling=[{"ignore_eos": True}] * 2, on_start=kill_expert)
    msg = str(err.value)
    assert "role expert.1 (rank 2)" in msg and "actor died" in msg
    assert seen["node_id"][:12] in msg and seen["node_id"] == node_with("msc_pool_L40S")
    # the killed actor's role process ends by itself (it watches its actor); the others were stopped
    wait_until(lambda: not worker_pids(str(bundle.path)), 15, "every role process gone")
    assert no_placement_groups_left()


def test_a_crashed_role_process_is_named_with_its_node(cluster, bundles):
    bundle = bundles["L40S"]
    with pytest.raises(MscError) as err:
        run_bundle_on_ray(bundle.path, PROMPTS, 50, address=cluster.address, timeout_s=120,
                          sampling=[{"ignore_eos": True}] * 2, env={FAULT_ROLE: "expert.0", FAULT_AFTER: "2"})
    msg = str(err.value)
    assert "role expert.0 (rank 1)" in msg and "exited with code 17" in msg
    assert node_with("msc_pool_L40S")[:12] in msg
    assert not worker_pids(str(bundle.path)) and no_placement_groups_left()


def test_a_cluster_without_a_pool_is_refused_before_anything_starts(cluster, bundles):
    groups_before = len(ray.util.placement_group_table())
    with pytest.raises(MscError) as err:
        run_bundle_on_ray(bundles["H800"].path, PROMPTS, NEW, address=cluster.address, timeout_s=60)
    msg = str(err.value)
    assert "the plan needs 2 role(s) with msc_pool_H800 (1 each, 2 in all) but the cluster has 0 of it" in msg
    assert "msc_pool_L40S: 2" in msg and "msc_pool_H20: 1" in msg  # the nodes as they are
    assert "H20" not in msg.split("; nodes:")[0]  # the attention pool is there: not listed as missing
    assert len(ray.util.placement_group_table()) == groups_before  # nothing was placed


DRIVER = """
import sys
from msc.runtime.ray_launch import run_bundle_on_ray
run_bundle_on_ray(sys.argv[1], [[5, 17, 42, 7]], 3000, address=sys.argv[2], timeout_s=300,
                  sampling=[{"ignore_eos": True}], on_start=lambda placed: print("started", flush=True))
"""


def test_a_killed_launcher_leaves_no_role_process(cluster, bundles):
    """SIGKILL on the launcher runs none of its clean-up: Ray ends the actors the dead driver owned, and each
    role process, watching its actor, ends with it."""
    bundle = bundles["L40S"]
    launcher = subprocess.Popen([sys.executable, "-c", DRIVER, str(bundle.path), cluster.address],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        ready, _, _ = select.select([launcher.stdout], [], [], 120)
        assert ready and launcher.stdout.readline().strip() == "started", "the launch did not start its roles"
        assert len(worker_pids(str(bundle.path))) == 3  # every role runs now (a 3000-token generation)
        launcher.kill()
        launcher.wait(timeout=10)
        wait_until(lambda: not worker_pids(str(bundle.path)), 30, "every role process gone")
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(timeout=10)
