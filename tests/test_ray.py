"""Cluster mode: `Cluster.ray` over several raylets of this machine (`ray.cluster_utils.Cluster`).

The engines are the same processes as in local mode, each a child of its supervisor actor in its
logical node's placement group bundle, moving KV over the mooncake transport; the controller runs
here. Greedy outputs must equal a local cluster's and transformers' over every read path; logical
nodes land on different Ray nodes; nothing listens on loopback; a killed engine and a killed
supervisor come back while the cluster keeps serving.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from dualpath_sdk.api.cluster import Cluster
from dualpath_sdk.config import EngineConfig
from dualpath_sdk.errors import EngineUnavailable, InvalidInput
from tests.conftest import Pair, hf_greedy

ray = pytest.importorskip("ray", reason="the ray extra is not installed (make test installs it)")
IP = os.environ.get("DUALPATH_TEST_NODE_IP")  # the private network namespace's address (tests/isolated.sh)
if IP is None:
    pytest.skip(
        "Ray's servers listen on every interface: these tests run only in the private network namespace "
        "that `make test` makes as root (tests/isolated.sh)",
        allow_module_level=True,
    )
if importlib.util.find_spec("mooncake") is None:
    pytest.skip("cluster mode needs mooncake-transfer-engine-non-cuda", allow_module_level=True)

from ray.cluster_utils import Cluster as RayNodes  # noqa: E402

from dualpath_sdk.cluster.ray_launcher import RayLauncher  # noqa: E402

BLOCK = 16
TURN_TOKENS = 37
NEW_TOKENS = 12
RAYLETS = 3  # the head and two more: more Ray nodes than the tests' two logical nodes


def _turn(seed: int) -> list[int]:
    return torch.randint(0, 512, (TURN_TOKENS,), generator=torch.Generator().manual_seed(seed)).tolist()


def _options(pair: Pair, store: Path) -> dict[str, Any]:
    return {
        "model": pair.path,
        "storage": store,
        "engine": EngineConfig(block_size=BLOCK, num_blocks=256),
        "buffer_slots": 64,
    }


@pytest.fixture(scope="module")
def ray_nodes() -> Iterator[RayNodes]:
    nodes = RayNodes(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": IP})
    for _ in range(RAYLETS - 1):
        nodes.add_node(num_cpus=1, node_ip_address=IP)
    ray.init(address=nodes.address, _node_ip_address=IP)
    nodes.wait_for_nodes()
    yield nodes
    ray.shutdown()
    nodes.shutdown()


@pytest.fixture(scope="module")
def cluster(
    ray_nodes: RayNodes, tiny_llama: Pair, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    with Cluster.ray(**_options(tiny_llama, tmp_path_factory.mktemp("ray-store"))) as running:
        yield running


@pytest.fixture(scope="module")
def local(tiny_llama: Pair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster.local(**_options(tiny_llama, tmp_path_factory.mktemp("local-store"))) as running:
        yield running


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's reaper may be late)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except (FileNotFoundError, IndexError):
        return False


def _launcher(cluster: Cluster) -> RayLauncher:
    launcher = cluster._launcher
    assert isinstance(launcher, RayLauncher)
    return launcher


@pytest.mark.parametrize("plan", ["pe", "de", "split"])
def test_greedy_outputs_equal_local_mode_and_transformers(
    cluster: Cluster, local: Cluster, tiny_llama: Pair, plan: str
) -> None:
    on_ray, on_local = cluster.session(), local.session()
    base = {"pe": 100, "de": 200, "split": 300}[plan]
    for turn in range(3):
        before, new = on_ray.token_ids, _turn(base + turn)
        ours = on_ray.step_tokens(new, max_tokens=NEW_TOKENS, ignore_eos=True, read_plan=plan)
        theirs = on_local.step_tokens(new, max_tokens=NEW_TOKENS, ignore_eos=True, read_plan=plan)
        assert ours.token_ids == theirs.token_ids, f"turn {turn}"
        assert ours.token_ids == hf_greedy(tiny_llama, before + new, NEW_TOKENS), f"turn {turn}"
        assert ours.usage.cached_tokens == theirs.usage.cached_tokens
        if turn > 0:  # the cached KV was read on the asked side and crossed mooncake where needed
            assert ours.usage.cached_tokens == len(before) - 1
            assert ours.load.plan == plan
            assert (ours.load.bytes_pe, ours.load.bytes_de) == (theirs.load.bytes_pe, theirs.load.bytes_de)


def test_logical_nodes_are_spread_over_ray_nodes_and_nothing_listens_on_loopback(cluster: Cluster) -> None:
    if shutil.which("ss") is None:
        pytest.skip("ss (iproute2) is needed to see what the processes listen on")
    launcher = _launcher(cluster)
    placed = launcher.ray_nodes()
    assert placed["pe0"] != placed["de0"]  # STRICT_SPREAD: 2 logical nodes, 3 Ray nodes
    node_ip = ray.util.get_node_ip_address()
    host, port = launcher.controller.address
    assert host == node_ip and not ipaddress.ip_address(host).is_loopback
    assert {spec.transfer.mooncake_hostname for spec in launcher.specs} == {node_ip}
    assert {spec.transfer.backend for spec in launcher.specs} == {"mooncake"}
    pids = {p.pid for p in launcher.processes.values()}
    lines = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout.splitlines()
    ours = [line.split()[3] for line in lines if any(f"pid={pid}," in line for pid in pids)]
    assert ours, "the engines listen (mooncake's RPC and data ports)"
    assert f"{node_ip}:{port}" in [line.split()[3] for line in lines]  # the control channel
    for address in ours:
        bound = address.rsplit(":", 1)[0].strip("[]")
        assert bound in ("*", "0.0.0.0", "::") or not ipaddress.ip_address(bound).is_loopback, address


def test_a_killed_engine_is_restarted_and_the_cluster_keeps_serving(
    cluster: Cluster, tiny_llama: Pair
) -> None:
    session = cluster.session()
    session.step_tokens(_turn(50), max_tokens=NEW_TOKENS, ignore_eos=True, read_plan="de")
    before, old_pid = session.token_ids, _launcher(cluster).processes["de0"].pid
    killer = threading.Timer(0.15, cluster.kill_engine, args=("de0",))
    killer.start()
    try:
        result = session.step_tokens(_turn(51), max_tokens=400, ignore_eos=True, read_plan="de")
    except EngineUnavailable:
        assert cluster.resume(session.id).token_ids == before  # a failed step changes nothing
    else:
        assert result.token_ids == hf_greedy(tiny_llama, before + _turn(51), 400)
    killer.join()
    resumed = cluster.resume(session.id)
    prompt = resumed.token_ids + _turn(52)
    again = resumed.step_tokens(_turn(52), max_tokens=NEW_TOKENS, ignore_eos=True, read_plan="de")
    assert again.token_ids == hf_greedy(tiny_llama, prompt, NEW_TOKENS)
    assert _launcher(cluster).processes["de0"].pid != old_pid
    restarts = cluster.metrics().get_sample_value("dualpath_engine_restarts_total", {"engine": "de0"})
    assert restarts is not None and restarts >= 1


def test_a_dead_supervisor_is_restarted_by_ray_with_its_engine(cluster: Cluster, tiny_llama: Pair) -> None:
    launcher = _launcher(cluster)
    old_pid = launcher.processes["pe0"].pid
    ray.kill(launcher.hosts["pe0"], no_restart=False)  # the actor's worker dies; Ray restarts the actor
    deadline = time.monotonic() + 120
    while launcher.processes["pe0"].pid == old_pid or not cluster.health()["pe0"]:
        assert time.monotonic() < deadline, "pe0 did not come back"
        time.sleep(0.5)
    assert not _running(old_pid)  # the old engine died with its supervisor
    session = cluster.session()
    for turn in range(2):
        prompt = session.token_ids + _turn(60 + turn)
        result = session.step_tokens(_turn(60 + turn), max_tokens=NEW_TOKENS, ignore_eos=True, read_plan="pe")
        assert result.token_ids == hf_greedy(tiny_llama, prompt, NEW_TOKENS)


def test_cluster_mode_refuses_the_shared_memory_transport(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="mooncake"):
        Cluster.ray(storage=tmp_path, transfer={"backend": "local"})
    with pytest.raises(InvalidInput, match="engines_per_node"):
        Cluster.ray(storage=tmp_path, engines_per_node=0)
