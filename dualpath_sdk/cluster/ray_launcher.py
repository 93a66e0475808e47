"""Cluster mode (`Cluster.ray`): the same engine processes, placed and supervised by Ray.

Placement: one placement group with one bundle per logical node (the CPUs of its engines), so a
node's engines share one Ray node, and with it one host's storage-NIC limiter. The strategy is
STRICT_SPREAD when the Ray cluster has as many alive nodes whose CPUs (their total, not what other
jobs leave free) fit a bundle as there are logical nodes, so no two logical nodes share a host;
otherwise SPREAD, as far apart as the cluster allows: logical nodes that share a host still keep
their own NIC state (it is keyed by node name), and a small cluster starts rather than waits for
nodes that may never come.

Engines: each engine is local mode's `python -m dualpath_sdk.engine`, a child of a small supervisor
actor (EngineHost) in its node's bundle, not engine code run inside an actor: the engine's loop
never returns, sizes its own torch threads, and must not share an interpreter with a Ray worker's
threads; as a child process it is exactly what local mode runs and tests, and the launcher's health
check reads its exit code and heartbeats as in local mode. Supervision has two layers. An engine that
exits or falls silent: the health check fails or retries its steps (the controller's retry) and has
the supervisor start it again. A supervisor that dies (its worker killed, its node lost) takes its
engine with it (PR_SET_PDEATHSIG) and Ray restarts it in its bundle (max_restarts=-1), on its node or,
once the node is gone, wherever the bundle is rescheduled; there it answers that it has no engine,
and the health check starts one.

Addresses: the control channel listens on the driver's node IP; each engine's transport is mooncake
(the local one's /dev/shm regions exist on one host only), started on its Ray node's IP, as is the
mooncake store's client when that is the store. The controller and scheduler run in the driver:
they are the in-process backend the caller's sessions step through, with no extra hop per event,
and they end with the program that owns the sessions, as in local mode (a detached actor would
outlive its caller and still need the caller's store).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import site
import subprocess
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

import dualpath_sdk
from dualpath_sdk.cluster.launcher import (
    STDERR_LINES,
    LocalLauncher,
    Spawner,
    forget_node_state,
    spawn_engine,
)
from dualpath_sdk.config import ClusterConfig, StoreConfig
from dualpath_sdk.engine.messages import Role
from dualpath_sdk.engine.process import EngineSpec
from dualpath_sdk.errors import EngineUnavailable, InvalidInput
from dualpath_sdk.store.limiter import granted_bytes

NO_ENGINE = -256  # an exit code no process has: its supervisor holds no engine (restarted, unreachable)
CALL_S = 3.0  # the longest the driver waits on one supervisor call (a restarting actor, a lost node)
log = logging.getLogger(__name__)


class EngineHost:
    """The supervisor actor of one engine on its Ray node: starts, polls, kills its engine process."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._tail: deque[str] = deque(maxlen=STDERR_LINES)
        self._spawner = Spawner()  # the engine dies with that thread, which lives as long as the actor

    def where(self) -> tuple[str, str]:
        """This Ray node's IP and id."""
        return ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id()

    def start(self, spec: EngineSpec, address: tuple[str, int], authkey: bytes) -> int:
        """A new engine process (the previous one killed first) on this node's address, which is not
        the one it was placed on once its bundle moved to another node; its pid."""
        self.kill()
        self._tail = deque(maxlen=STDERR_LINES)
        spec = on_node(spec, ray.util.get_node_ip_address())
        self._process, self._reader = spawn_engine(self._spawner, spec, address, authkey, self._tail)
        return self._process.pid

    def poll(self) -> int | None:
        return NO_ENGINE if self._process is None else self._process.poll()

    def wait(self, timeout: float) -> int | None:
        """The exit code, or None if the engine still runs after `timeout` s."""
        if self._process is None:
            return NO_ENGINE
        try:
            return self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(5)

    def tail(self) -> list[str]:
        """The engine's last lines on stderr (all of them once it exited)."""
        if self._reader is not None and self.poll() is not None:
            self._reader.join(2.0)
        return list(self._tail)

    def granted(self, node: str) -> tuple[float, float]:
        return granted_bytes(node)

    def forget(self, nodes: list[str], shm_dir: Path) -> None:
        forget_node_state(nodes, shm_dir)


class _RemoteEngine:
    """An engine process on a Ray node as the health check sees a local one (launcher.EngineProcess).

    A supervisor that does not answer in CALL_S counts as running: the engine's heartbeat decides."""

    def __init__(self, host: Any, pid: int) -> None:
        self._host = host
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        code = _call(self._host.poll, default=None)
        if code is not None:
            self.returncode = code
        return code

    def wait(self, timeout: float | None = None) -> int:
        limit = CALL_S if timeout is None else timeout
        code = _call(self._host.wait, limit, timeout=limit + CALL_S, default=None)
        if code is None:
            raise subprocess.TimeoutExpired(f"engine {self.pid}", limit)
        self.returncode = code
        return code

    def kill(self) -> None:
        _call(self._host.kill, default=None)


class RayLauncher(LocalLauncher):
    """LocalLauncher's controller, health check and respawns, over engines that Ray places."""

    def __init__(
        self, config: ClusterConfig, model_path: str | None, address: str | None, engines_per_node: int
    ) -> None:
        """`address`: the Ray cluster's ("auto", "ray://...", None: RAY_ADDRESS or a new local one),
        unless this process is connected already, then that connection is used (and kept)."""
        self.engines_per_node = engines_per_node
        self.layout: list[tuple[Role, int]] = [("pe", i) for i in range(config.prefill_nodes)]
        self.layout += [("de", i) for i in range(config.decode_nodes)]
        self._owns_ray = not ray.is_initialized()
        self._group: PlacementGroup | None = None
        self.hosts: dict[str, Any] = {}  # engine id -> its EngineHost actor
        try:
            if self._owns_ray:
                _keeping_signals(lambda: ray.init(address=address))
            self._ips = self._place(config)
            driver_ip = ray.util.get_node_ip_address()
        except BaseException:
            self._release()
            raise
        super().__init__(config, model_path, host=driver_ip)  # its failure calls close()

    # ---- placement ---------------------------------------------------------------------------------

    def _place(self, config: ClusterConfig) -> list[str]:
        """The placement group, and each engine's supervisor in its node's bundle; each node's IP."""
        n = len(self.layout)
        cpus = float(self.engines_per_node * config.threads_per_engine)
        roomy = [node for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU", 0.0) >= cpus]
        strategy = "STRICT_SPREAD" if len(roomy) >= n else "SPREAD"
        if strategy == "SPREAD":
            log.warning("%d logical nodes, %d Ray nodes with %s CPUs: some share a host", n, len(roomy), cpus)
        self._group = placement_group([{"CPU": cpus}] * n, strategy=strategy)
        try:
            ray.get(self._group.ready(), timeout=config.startup_timeout_s)
        except GetTimeoutError:
            raise EngineUnavailable(
                f"Ray could not place {n} nodes of {cpus} CPUs ({strategy}) in {config.startup_timeout_s} s"
            ) from None
        actor, env = ray.remote(EngineHost), _runtime_env()
        for bundle, (role, index) in enumerate(self.layout):
            in_bundle = PlacementGroupSchedulingStrategy(self._group, placement_group_bundle_index=bundle)
            for engine_id in self._engine_ids(role, index):
                self.hosts[engine_id] = actor.options(
                    num_cpus=config.threads_per_engine,
                    max_restarts=-1,
                    scheduling_strategy=in_bundle,
                    runtime_env=env,
                ).remote()
        firsts = [self.hosts[self._engine_ids(role, index)[0]] for role, index in self.layout]
        return [ip for ip, _ in ray.get([h.where.remote() for h in firsts], timeout=config.startup_timeout_s)]

    def _engine_ids(self, role: Role, index: int) -> list[str]:
        k = self.engines_per_node
        return [f"{role}{index * k + j}" for j in range(k)]

    def _specs(self, model_path: str | None) -> list[EngineSpec]:
        """Each node's engines, their transport (and mooncake store client) on the node's IP."""
        return [
            on_node(self._spec(engine_id, role, index, model_path), ip)
            for (role, index), ip in zip(self.layout, self._ips, strict=True)
            for engine_id in self._engine_ids(role, index)
        ]

    # ---- the engines, through their supervisors -----------------------------------------------------

    def _start(self, spec: EngineSpec) -> None:
        """Have the engine's supervisor start it; a supervisor that cannot be reached now (restarting,
        its node lost) leaves it to the health check's next look."""
        with self._lock:
            if self._closing.is_set():
                return
            host = self.hosts[spec.engine_id]
            pid = _call(host.start, spec, self.controller.address, self._authkey, default=NO_ENGINE)
            self.processes[spec.engine_id] = _RemoteEngine(host, pid)

    def _last_lines(self, engine_ids: list[str]) -> str:
        for eid in engine_ids:
            self.stderr_tail[eid] = deque(_call(self.hosts[eid].tail, default=[]))
        return super()._last_lines(engine_ids)

    def storage_nic_bytes(self) -> dict[str, tuple[float, float]]:
        """Each node's figures, from its own host (the limiter's state is per host)."""
        first = {spec.node: self.hosts[spec.engine_id] for spec in self.specs}
        return {node: _granted(host, node) for node, host in first.items()}

    def ray_nodes(self) -> dict[str, str | None]:
        """The Ray node id of each engine's supervisor now (None: it does not answer)."""
        wheres = {eid: _call(host.where, default=None) for eid, host in self.hosts.items()}
        return {eid: None if where is None else where[1] for eid, where in wheres.items()}

    def close(self) -> None:
        super().close()
        for spec in self.specs:  # each host's NIC state, by one of its engines' supervisors
            _call(self.hosts[spec.engine_id].forget, [spec.node], self.config.transfer.shm_dir, default=None)
        self._release()

    def _release(self) -> None:
        for host in self.hosts.values():
            with contextlib.suppress(Exception):
                ray.kill(host)
        if self._group is not None:
            with contextlib.suppress(Exception):
                remove_placement_group(self._group)
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()


def on_node(spec: EngineSpec, ip: str) -> EngineSpec:
    """The engine as it runs on the host at `ip`: its transport and store client there."""
    transfer = spec.transfer.model_copy(update={"backend": "mooncake", "mooncake_hostname": ip})
    return replace(spec, transfer=transfer, store=on_host(spec.store, ip))


def on_host(store: StoreConfig, ip: str) -> StoreConfig:
    """The store as a client on `ip` uses it: the mooncake store's client on that address, its master
    not on loopback, its pins' index journalled without shared memory; fs: a directory every host
    mounts at the same path, with the index that hosts can share (store/shared_index.py)."""
    if store.backend != "mooncake":
        return store.model_copy(update={"index": "shared"})
    # its pins' SQLite index sits in the shared root too: WAL needs one host's shared memory
    store = store.model_copy(update={"index_journal": "DELETE"})
    master = store.mooncake.master_address.rsplit(":", 1)[0].strip("[]")
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(master).is_loopback:
            raise InvalidInput(f"the mooncake master at {master} is on loopback: other hosts cannot reach it")
    if master == "localhost":
        raise InvalidInput("the mooncake master at localhost: other hosts cannot reach it")
    return store.model_copy(update={"mooncake": store.mooncake.model_copy(update={"local_hostname": ip})})


def _keeping_signals(connect: Callable[[], object]) -> None:
    """Connect to Ray, keeping this program's SIGINT/SIGTERM handlers: Ray's driver installs its own
    (a stack dump, then abort), which would take `dualpath serve`'s graceful shutdown away."""
    if threading.current_thread() is not threading.main_thread():
        connect()  # only the main thread sets handlers, Ray's too
        return
    kept = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    connect()
    for sig, handler in kept.items():
        if handler is not None:
            signal.signal(sig, handler)


def _runtime_env() -> dict[str, Any]:
    """This very package importable by the supervisors: a checkout that is not installed is put on
    their PYTHONPATH (the same path on every host: a shared mount; an installed package needs none)."""
    root = str(Path(dualpath_sdk.__file__).resolve().parent.parent)
    site_dirs = {str(Path(d).resolve()) for d in [*site.getsitepackages(), site.getusersitepackages()]}
    if root in site_dirs:
        return {}
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    return {"env_vars": {"PYTHONPATH": path}}


def _granted(host: Any, node: str) -> tuple[float, float]:
    read, written = _call(host.granted, node, default=(0.0, 0.0))
    return float(read), float(written)


def _call(method: Any, *args: Any, timeout: float = CALL_S, default: Any) -> Any:
    """One supervisor call; `default` when it is gone or does not answer in `timeout` s."""
    try:
        return ray.get(method.remote(*args), timeout=timeout)
    except (GetTimeoutError, RayActorError):
        return default
