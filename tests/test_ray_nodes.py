"""Cluster mode across Ray nodes that come and go (slow: raylets start and stop).

A whole Ray node lost: its engines' steps are retried on the other nodes and the cluster keeps
serving; the node's engines come back once a node with room joins. A node's engines share its Ray
node (engines_per_node).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dualpath_sdk.api.cluster import Cluster
from tests.conftest import Pair, hf_greedy

ray = pytest.importorskip("ray", reason="the ray extra is not installed (make test installs it)")

from ray.cluster_utils import Cluster as RayNodes  # noqa: E402

from tests.test_ray import IP, NEW_TOKENS, _launcher, _options, _turn  # noqa: E402

pytestmark = pytest.mark.slow
COME_BACK_S = 180.0


@pytest.fixture(scope="module")
def ray_nodes() -> Iterator[RayNodes]:
    """A head with no CPUs (nothing of ours lands on it: it can stay) and three 1-CPU nodes."""
    nodes = RayNodes(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": IP})
    for _ in range(3):
        nodes.add_node(num_cpus=1, node_ip_address=IP)
    ray.init(address=nodes.address, _node_ip_address=IP)
    nodes.wait_for_nodes()
    yield nodes
    ray.shutdown()
    nodes.shutdown()


def _until(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + COME_BACK_S
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


def test_a_lost_ray_node_fails_over_and_its_engine_returns_with_a_new_node(
    ray_nodes: RayNodes, tiny_llama: Pair, tmp_path: Path
) -> None:
    with Cluster.ray(prefill_nodes=2, decode_nodes=1, **_options(tiny_llama, tmp_path)) as cluster:
        placed = _launcher(cluster).ray_nodes()
        assert len(set(placed.values())) == 3  # STRICT_SPREAD over the three 1-CPU nodes
        (victim,) = [n for n in ray_nodes.worker_nodes if n.node_id == placed["pe1"]]
        session = cluster.session()
        session.step_tokens(_turn(70), max_tokens=NEW_TOKENS, ignore_eos=True, read_plan="pe")
        ray_nodes.remove_node(victim, allow_graceful=False)  # its raylet, supervisor and engine die
        for turn in range(1, 5):  # steps placed on pe1 as it went are retried on pe0
            prompt = session.token_ids + _turn(70 + turn)
            result = session.step_tokens(
                _turn(70 + turn), max_tokens=NEW_TOKENS, ignore_eos=True, read_plan="pe"
            )
            assert result.token_ids == hf_greedy(tiny_llama, prompt, NEW_TOKENS), f"turn {turn}"
        _until("pe1 found dead", lambda: not cluster.health()["pe1"])
        assert cluster.health()["pe0"] and cluster.health()["de0"]
        # its bundle is placed again on the node that joins, and Ray restarts pe1 there
        joined = ray_nodes.add_node(num_cpus=1, node_ip_address=IP)
        _until("pe1 back on the new node", lambda: cluster.health()["pe1"])
        assert _launcher(cluster).ray_nodes()["pe1"] == joined.node_id
        for turn in range(5, 8):  # and it serves on
            prompt = session.token_ids + _turn(70 + turn)
            result = session.step_tokens(
                _turn(70 + turn), max_tokens=NEW_TOKENS, ignore_eos=True, read_plan="de"
            )
            assert result.token_ids == hf_greedy(tiny_llama, prompt, NEW_TOKENS), f"turn {turn}"


def test_a_nodes_engines_share_its_ray_node(ray_nodes: RayNodes, tiny_llama: Pair, tmp_path: Path) -> None:
    for _ in range(2):  # room for two engines on one node: 2 CPUs
        ray_nodes.add_node(num_cpus=2, node_ip_address=IP)
    with Cluster.ray(engines_per_node=2, **_options(tiny_llama, tmp_path)) as cluster:
        launcher = _launcher(cluster)
        placed = launcher.ray_nodes()
        assert placed["pe0"] == placed["pe1"] != placed["de0"] == placed["de1"]
        nodes = {spec.engine_id: spec.node for spec in launcher.specs}
        assert nodes["pe0"] == nodes["pe1"] and nodes["de0"] == nodes["de1"]  # one storage NIC each
        session = cluster.session()
        for turn, plan in enumerate(["pe", "de", "split"]):
            prompt = session.token_ids + _turn(80 + turn)
            result = session.step_tokens(
                _turn(80 + turn), max_tokens=NEW_TOKENS, ignore_eos=True, read_plan=plan
            )
            assert result.token_ids == hf_greedy(tiny_llama, prompt, NEW_TOKENS), plan
