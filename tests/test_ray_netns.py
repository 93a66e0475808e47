"""Cluster mode with every logical node in its own network namespace (slow; root, in isolated.sh's).

Each worker raylet (and so its supervisors and engines) runs in a namespace of its own, whose only
link is a veth pair to a bridge in the test's namespace, shaped by `tc tbf`; the head, the GCS and
the driver (the controller) sit on the bridge's address. So every control message and KV byte
between the engines and the controller, and between the PE and the DE, crosses a link: a loopback
shortcut cannot exist (another namespace's loopback is not reachable). The test checks that outputs
still equal transformers' over pe, de and split reads, that the engines live in their namespaces,
and that both links carried at least the KV read on the DE side (which the DE sends the PE).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dualpath_sdk.api.cluster import Cluster
from tests.conftest import Pair, hf_greedy

ray = pytest.importorskip("ray", reason="the ray extra is not installed (make test installs it)")

from ray.cluster_utils import Cluster as RayNodes  # noqa: E402

from tests.test_ray import IP, NEW_TOKENS, _launcher, _options, _turn  # noqa: E402

pytestmark = pytest.mark.slow
BRIDGE, HUB = "dp-br0", "10.78.0.1"
RATE = "400mbit"  # each node's link: the KV of a step takes milliseconds, not a loopback's microseconds
SHAPED = ("root", "tbf", "rate", RATE, "burst", "256kb", "latency", "50ms")  # both ends of a link
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")


class Namespace:
    """A network namespace held open by a sleeping process, linked to the bridge by a shaped veth pair."""

    def __init__(self, index: int) -> None:
        self.ip = f"10.78.0.{10 + index}"
        self.outer = f"dp-n{index}"
        self.holder = subprocess.Popen(["unshare", "-n", "sleep", "infinity"])
        path = f"/proc/{self.holder.pid}/ns/net"
        deadline = time.monotonic() + 5
        while os.readlink(path) == os.readlink("/proc/self/ns/net"):
            assert time.monotonic() < deadline, "unshare did not make a namespace"
            time.sleep(0.01)
        self.inode = os.readlink(path)
        self.fd = os.open(path, os.O_RDONLY)
        inner = f"nsenter --net={path}".split()
        _sh(
            "ip",
            "link",
            "add",
            self.outer,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            str(self.holder.pid),
        )
        _sh("ip", "link", "set", self.outer, "master", BRIDGE, "up")
        _sh("tc", "qdisc", "add", "dev", self.outer, *SHAPED)
        _sh(*inner, "ip", "link", "set", "lo", "up")
        _sh(*inner, "ip", "addr", "add", f"{self.ip}/24", "dev", "eth0")
        _sh(*inner, "ip", "link", "set", "eth0", "up")
        _sh(*inner, "tc", "qdisc", "add", "dev", "eth0", *SHAPED)

    def bytes(self) -> int:
        """Bytes through its link, both ways (the bridge side of the veth; /proc/net follows this
        process's namespace, /sys would show the host's)."""
        for line in Path("/proc/self/net/dev").read_text().splitlines():
            name, _, counters = line.partition(":")
            if name.strip() == self.outer:
                fields = counters.split()
                return int(fields[0]) + int(fields[8])
        raise AssertionError(f"no link {self.outer}")

    def close(self) -> None:
        os.close(self.fd)
        self.holder.kill()
        self.holder.wait(5)
        subprocess.run(["ip", "link", "del", self.outer], capture_output=True)


@pytest.fixture(scope="module")
def linked() -> Iterator[tuple[RayNodes, list[Namespace]]]:
    if IP is None or os.geteuid() != 0:
        pytest.skip("needs root inside tests/isolated.sh's namespace")
    _sh("ip", "link", "add", BRIDGE, "type", "bridge")
    _sh("ip", "addr", "add", f"{HUB}/24", "dev", BRIDGE)
    _sh("ip", "link", "set", BRIDGE, "up")
    spaces: list[Namespace] = []
    nodes = None
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        spaces = [Namespace(i) for i in range(2)]
        nodes = RayNodes(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": HUB})
        for space in spaces:  # the raylet and every process it starts inherit this thread's namespace
            _setns(space.fd)
            try:
                nodes.add_node(num_cpus=1, node_ip_address=space.ip)
            finally:
                _setns(home)
        ray.init(address=nodes.address, _node_ip_address=HUB)
        nodes.wait_for_nodes()
        yield nodes, spaces
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if nodes is not None:
            nodes.shutdown()
        for space in spaces:
            space.close()
        os.close(home)
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)


def test_every_byte_crosses_a_shaped_link_between_namespaces(
    linked: tuple[RayNodes, list[Namespace]], tiny_llama: Pair, tmp_path: Path
) -> None:
    _, spaces = linked
    with Cluster.ray(**_options(tiny_llama, tmp_path)) as cluster:
        launcher = _launcher(cluster)
        assert launcher.controller.address[0] == HUB
        by_engine = {eid: os.readlink(f"/proc/{p.pid}/ns/net") for eid, p in launcher.processes.items()}
        homes = {s.inode: s.ip for s in spaces}
        assert set(by_engine.values()) == set(homes), by_engine  # one engine per namespace
        assert {spec.transfer.mooncake_hostname for spec in launcher.specs} == set(homes.values())
        print(f"\nengines: { {eid: homes[ino] for eid, ino in by_engine.items()} }, controller {HUB}")
        session = cluster.session()
        for turn, plan in enumerate(("pe", "de", "split", "de")):
            before, new = session.token_ids, _turn(110 + turn)
            links = [s.bytes() for s in spaces]
            started = time.perf_counter()
            result = session.step_tokens(new, max_tokens=NEW_TOKENS, ignore_eos=True, read_plan=plan)
            wall = time.perf_counter() - started
            crossed = [s.bytes() - b for s, b in zip(spaces, links, strict=True)]
            assert result.token_ids == hf_greedy(tiny_llama, before + new, NEW_TOKENS), f"turn {turn}"
            print(
                f"turn {turn} plan {plan}: cached {result.usage.cached_tokens} tokens, KV read PE "
                f"{result.load.bytes_pe} B DE {result.load.bytes_de} B; links carried "
                f"{dict(zip((s.ip for s in spaces), crossed, strict=True))} B; {wall:.2f} s"
            )
            assert min(crossed) > 0  # control messages at least, on every link
            if turn > 0:
                assert result.usage.cached_tokens == len(before) - 1
                assert min(crossed) >= result.load.bytes_de  # the DE-read KV went to the PE over both links
