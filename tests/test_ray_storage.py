"""Cluster mode's storage (slow: each test starts its own Ray cluster and engines).

The Mooncake Store backend: its master on the head node, bound to that node's address (inside the
private namespace), reached by every engine by that address, never loopback.

Resume after the whole Ray cluster restarts. Nothing of a session lives in Ray: its manifest and its
blocks are in the store (the fs backend with the index hosts share), so a session stepped on one Ray
cluster, which is then torn down, takes its next step on a new one over the same storage from its
persisted KV, with the output of a run that was never interrupted (equal to transformers', as local
mode's is).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dualpath_sdk.api.cluster import Cluster
from dualpath_sdk.config import MooncakeConfig, StoreConfig
from dualpath_sdk.errors import StorageError
from dualpath_sdk.store.mooncake import INSTALL_HINT, MooncakeStore, master_binary
from tests.conftest import Pair, hf_greedy

ray = pytest.importorskip("ray", reason="the ray extra is not installed (make test installs it)")

from ray.cluster_utils import Cluster as RayNodes  # noqa: E402

from tests.test_ray import IP, NEW_TOKENS, _launcher, _options, _turn  # noqa: E402

pytestmark = pytest.mark.slow


def _ray_up() -> RayNodes:
    nodes = RayNodes(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": IP})
    nodes.add_node(num_cpus=1, node_ip_address=IP)
    ray.init(address=nodes.address, _node_ip_address=IP)
    nodes.wait_for_nodes()
    return nodes


def _ray_down(nodes: RayNodes) -> None:
    ray.shutdown()
    nodes.shutdown()


def test_a_session_resumes_from_its_persisted_kv_after_the_ray_cluster_restarts(
    tiny_llama: Pair, tmp_path: Path
) -> None:
    nodes = _ray_up()
    try:
        with Cluster.ray(**_options(tiny_llama, tmp_path)) as cluster:
            session = cluster.session()
            for turn in range(2):
                session.step_tokens(_turn(80 + turn), max_tokens=NEW_TOKENS, ignore_eos=True, read_plan="pe")
            session_id, before = session.id, session.token_ids
    finally:
        _ray_down(nodes)
    assert not ray.is_initialized()
    nodes = _ray_up()  # a new Ray cluster: new raylets, new supervisors, new engine processes
    try:
        with Cluster.ray(**_options(tiny_llama, tmp_path)) as cluster:
            resumed = cluster.resume(session_id)
            assert resumed.token_ids == before
            result = resumed.step_tokens(_turn(82), max_tokens=NEW_TOKENS, ignore_eos=True, read_plan="split")
            assert result.usage.cached_tokens == len(before) - 1  # all the persisted KV it could reuse
            assert result.load.plan == "split"
            assert result.token_ids == hf_greedy(tiny_llama, before + _turn(82), NEW_TOKENS)
    finally:
        _ray_down(nodes)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((IP, 0))
        return int(s.getsockname()[1])


@pytest.fixture
def master(tmp_path: Path) -> Iterator[str]:
    """A mooncake_master on the head node's address (the namespace's veth), as a head would run it."""
    try:
        binary = master_binary()
    except StorageError as exc:
        pytest.skip(f"mooncake unavailable: {exc}; {INSTALL_HINT}")
    rpc, metrics = _free_port(), _free_port()
    log = open(tmp_path / "master.log", "wb")  # noqa: SIM115  (closed below)
    process = subprocess.Popen(
        [str(binary), f"-rpc_address={IP}", f"-rpc_port={rpc}", f"-metrics_host={IP}",
         f"-metrics_port={metrics}", "-enable_metric_reporting=false", "-default_kv_lease_ttl=100"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while True:
            assert process.poll() is None, (tmp_path / "master.log").read_text()[-2000:]
            with socket.socket() as probe:
                if probe.connect_ex((IP, rpc)) == 0:
                    break
            assert time.monotonic() < deadline, "mooncake_master did not start listening"
            time.sleep(0.05)
        yield f"{IP}:{rpc}"
    finally:
        process.kill()
        process.wait(10)
        log.close()


def test_the_mooncake_store_on_the_head_node_serves_engines_on_other_ray_nodes(
    master: str, tiny_llama: Pair, tmp_path: Path
) -> None:
    if shutil.which("ss") is None:
        pytest.skip("ss (iproute2) is needed to see who talks to the master")
    mooncake = MooncakeConfig(
        master_address=master, global_segment_bytes=64 << 20, local_buffer_bytes=16 << 20
    )
    store = StoreConfig(backend="mooncake", root=tmp_path / "index", mooncake=mooncake)
    nodes = _ray_up()
    try:
        with Cluster.ray(**(_options(tiny_llama, tmp_path) | {"storage": store})) as cluster:
            launcher = _launcher(cluster)
            assert isinstance(cluster.store, MooncakeStore)
            assert {spec.store.backend for spec in launcher.specs} == {"mooncake"}
            assert {spec.store.mooncake.local_hostname for spec in launcher.specs} == {IP}
            placed = launcher.ray_nodes()
            assert placed["pe0"] != placed["de0"]
            session = cluster.session()
            for turn, plan in enumerate(("pe", "de", "split")):
                before, new = session.token_ids, _turn(90 + turn)
                result = session.step_tokens(new, max_tokens=NEW_TOKENS, ignore_eos=True, read_plan=plan)
                assert result.token_ids == hf_greedy(tiny_llama, before + new, NEW_TOKENS)
                if turn > 0:  # read back from the store the PE wrote on another Ray node
                    assert result.usage.cached_tokens == len(before) - 1
            rpc = master.rsplit(":", 1)[1]
            out = subprocess.run(["ss", "-Htn", "state", "established"], capture_output=True, text=True)
            peers = [
                line.split()[-1] for line in out.stdout.splitlines() if line.split()[-2].endswith(f":{rpc}")
            ]
            assert peers and all(p.rsplit(":", 1)[0] == IP for p in peers), peers  # by the node IP
    finally:
        _ray_down(nodes)
