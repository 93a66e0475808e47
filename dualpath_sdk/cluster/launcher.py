"""Local engine processes: start one per PE/DE node, watch their health, respawn the dead.

Each engine is `python -m dualpath_sdk.engine`, a fresh interpreter: unlike a multiprocessing spawn
it never re-imports the user's `__main__`, so a cluster starts from a script without a main guard,
`python -c`, a script on stdin, a REPL or a notebook kernel. Its spec and the control channel's
authkey reach it as one pickle on its stdin. Its stderr comes back through a pipe: each line is
forwarded to ours, prefixed with the engine's id, and the last lines are kept, so that an engine
that fails to start says why in the EngineUnavailable raised here.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import secrets
import site
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import IO, Protocol, TypeVar

import dualpath_sdk
from dualpath_sdk.cluster.controller import Controller
from dualpath_sdk.config import ClusterConfig
from dualpath_sdk.engine.messages import Role
from dualpath_sdk.engine.process import HEARTBEAT_S, EngineSpec
from dualpath_sdk.errors import EngineUnavailable
from dualpath_sdk.store.limiter import granted_bytes

DEAD_AFTER_S = 10 * HEARTBEAT_S  # no heartbeat for this long: the engine is hung
STDERR_LINES = 50  # kept per engine, for the message of a failed start
ERROR_LINES = 12  # of those, in that message
CLOSE_WAIT_S = 10.0  # for the engines to take their goodbye, all together, before they are killed

T = TypeVar("T")


class EngineProcess(Protocol):
    """What the health check needs of an engine process: a local Popen, or one on a Ray node."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> int | None: ...

    def kill(self) -> None: ...

    def wait(self, timeout: float | None = None) -> int: ...


class LocalLauncher:
    def __init__(self, config: ClusterConfig, model_path: str | None, host: str = "127.0.0.1") -> None:
        """`host`: where the control channel listens, for the engines to dial."""
        self.config = config
        self._authkey = secrets.token_bytes(32)
        # node names key the nodes' shared NIC state (/dev/shm): another cluster must not share it
        self.tag = secrets.token_hex(4)
        self.controller = Controller(self._authkey, config, host)
        self.specs = self._specs(model_path)
        self.processes: dict[str, EngineProcess] = {}
        self.stderr_tail: dict[str, deque[str]] = {}  # the last lines of each engine's current process
        self._readers: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()  # starts against close
        self._closing = threading.Event()
        self._stopped = threading.Event()  # the health check's end, once the engines are gone
        self._spawner = Spawner()
        self._health = threading.Thread(target=self._watch, name="engine-health", daemon=True)
        try:
            for spec in self.specs:
                self._start(spec)
            self._wait_for_start(config.startup_timeout_s)
        except BaseException:
            self.close()
            raise
        self._health.start()

    def _wait_for_start(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.controller.wait_for_engines(len(self.specs), timeout=1.0)
                return
            except EngineUnavailable:
                exited = [eid for eid, p in self.processes.items() if p.poll() is not None]
                if exited:
                    codes = ", ".join(f"{eid} (exit code {self.processes[eid].returncode})" for eid in exited)
                    raise EngineUnavailable(
                        f"the cluster did not start: engine processes exited while starting: {codes}"
                        + self._last_lines(exited)
                    ) from None
                if time.monotonic() > deadline:
                    started = self.controller.last_seen()
                    waiting = [eid for eid in self.processes if eid not in started]
                    raise EngineUnavailable(
                        f"the cluster did not start: start timed out after {timeout} s, "
                        f"waiting for {', '.join(waiting) or 'no engine'}" + self._last_lines(waiting)
                    ) from None

    def _last_lines(self, engine_ids: list[str]) -> str:
        """What those engines last wrote to stderr (a traceback's end says why a start failed)."""
        tails: dict[tuple[str, ...], list[str]] = {}  # engines that failed alike are told once
        for eid in engine_ids:
            reader = self._readers.get(eid)
            if reader is not None and self.processes[eid].poll() is not None:
                reader.join(2.0)  # an exited engine: read its pipe to the end
            tails.setdefault(tuple(self.stderr_tail.get(eid, ()))[-ERROR_LINES:], []).append(eid)
        return "".join(
            f"\n--- the last lines of {' and '.join(eids)} on stderr:\n" + "\n".join(lines)
            for lines, eids in tails.items()
            if lines
        )

    def _specs(self, model_path: str | None) -> list[EngineSpec]:
        """One engine per node: pe0 on the first PE node, ..., then the DEs."""
        c = self.config
        specs = [self._spec(f"pe{i}", "pe", i, model_path) for i in range(c.prefill_nodes)]
        return specs + [self._spec(f"de{i}", "de", i, model_path) for i in range(c.decode_nodes)]

    def _spec(self, engine_id: str, role: Role, node_index: int, model_path: str | None) -> EngineSpec:
        c = self.config
        node = f"{self.tag}-{role}-node{node_index}"
        return EngineSpec(
            engine_id,
            role,
            node,
            model_path,
            c.engine,
            c.store,
            c.transfer,
            c.buffer_slots,
            c.threads_per_engine,
            c.scheduler,
        )

    def _start(self, spec: EngineSpec) -> None:
        with self._lock:
            if self._closing.is_set():
                return
            tail: deque[str] = deque(maxlen=STDERR_LINES)
            process, reader = spawn_engine(self._spawner, spec, self.controller.address, self._authkey, tail)
            self.processes[spec.engine_id] = process
            self.stderr_tail[spec.engine_id] = tail
            self._readers[spec.engine_id] = reader

    def _watch(self) -> None:
        """Dead (exited, or silent for DEAD_AFTER_S): retry or fail its steps, then respawn it."""
        while not self._stopped.wait(HEARTBEAT_S):
            if self._closing.is_set():
                continue  # the engines are leaving: no respawns, but this thread outlives them
            seen = self.controller.last_seen()
            now = time.monotonic()
            for spec in self.specs:
                process = self.processes[spec.engine_id]
                running = process.poll() is None
                silent = spec.engine_id in seen and now - seen[spec.engine_id] > DEAD_AFTER_S
                if running and not silent:
                    continue
                if spec.engine_id not in seen and running:
                    continue  # still starting
                self.controller.engine_died(spec.engine_id)
                process.kill()  # a no-op once it exited
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(5)
                self._start(spec)
                self.controller.metrics.engine_restarts.labels(spec.engine_id).inc()

    def kill(self, engine_id: str) -> int:
        """SIGKILL one engine process (failure tests); returns its pid."""
        process = self.processes[engine_id]
        process.kill()
        return process.pid

    @property
    def nodes(self) -> list[str]:
        return sorted({spec.node for spec in self.specs})

    def storage_nic_bytes(self) -> dict[str, tuple[float, float]]:
        """Bytes each node's storage NIC has read and written so far: {node: (read, written)}."""
        return {node: granted_bytes(node) for node in self.nodes}

    def close(self) -> None:
        with self._lock:
            self._closing.set()
        self.controller.close()  # its goodbye ends each engine's loop
        deadline = time.monotonic() + CLOSE_WAIT_S
        for process in self.processes.values():
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(5)
        # only now: the engines were started from these threads, and die with them (PR_SET_PDEATHSIG)
        self._stopped.set()
        if self._health.is_alive():
            self._health.join(5)
        self._spawner.stop()
        for reader in self._readers.values():
            reader.join(1.0)  # the engines' last words reach our stderr
        forget_node_state(self.nodes, self.config.transfer.shm_dir)


def forget_node_state(nodes: list[str], shm_dir: Path) -> None:
    """Remove the nodes' emulated NIC state (storage limiter, link) from this host."""
    for directory in {Path("/dev/shm"), shm_dir}:
        for node in nodes:
            for path in directory.glob(f"dualpath-*-{node}"):
                path.unlink(missing_ok=True)


def spawn_engine(
    spawner: Spawner, spec: EngineSpec, address: tuple[str, int], authkey: bytes, tail: deque[str]
) -> tuple[subprocess.Popen[bytes], threading.Thread]:
    """Start `python -m dualpath_sdk.engine` from the spawner's thread and hand it its spec on stdin;
    its stderr is forwarded to ours, prefixed with its id, by the returned thread, which keeps the last
    lines in `tail`."""
    process = spawner.call(
        lambda: subprocess.Popen(
            [sys.executable, "-m", "dualpath_sdk.engine", spec.engine_id],  # the id: for `ps`
            stdin=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_child_env(spec),
            close_fds=True,
        )
    )
    assert process.stdin is not None and process.stderr is not None
    reader = threading.Thread(
        target=_forward_stderr,
        args=(process.stderr, f"[{spec.engine_id}] ", tail),
        name=f"engine-stderr-{spec.engine_id}",
        daemon=True,
    )
    reader.start()
    message = (os.getpid(), spec, address, authkey)
    with contextlib.suppress(OSError):  # it died at once: the start or the health check sees it
        process.stdin.write(pickle.dumps(message))
    with contextlib.suppress(OSError):
        process.stdin.close()
    return process, reader


class Spawner:
    """Starts every engine process from one thread that lives as long as the launcher.

    The kernel sends an engine its death signal (PR_SET_PDEATHSIG) when the *thread* that started
    it ends, and a caller's thread (a pool's worker, say) may end long before the cluster does."""

    def __init__(self) -> None:
        self._calls: queue.Queue[tuple[Callable[[], object], Future[object]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="engine-spawner", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], T]) -> T:
        future: Future[object] = Future()
        self._calls.put((fn, future))
        return future.result()  # type: ignore[return-value]

    def _run(self) -> None:
        while (item := self._calls.get()) is not None:
            fn, future = item
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

    def stop(self) -> None:
        self._calls.put(None)
        self._thread.join(5)


def _child_env(spec: EngineSpec) -> dict[str, str]:
    """Ours, with the engine's thread budget for OpenMP/MKL, and this very package importable."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(spec.threads)
    root = str(Path(dualpath_sdk.__file__).resolve().parent.parent)
    site_dirs = {str(Path(d).resolve()) for d in [*site.getsitepackages(), site.getusersitepackages()]}
    if root not in site_dirs:  # found through sys.path or the working directory, which `-m` may lack
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def _forward_stderr(pipe: IO[bytes], prefix: str, tail: deque[str]) -> None:
    """Copy an engine's stderr to ours line by line, prefixed; keep its last lines."""
    with pipe:
        for raw in iter(pipe.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            tail.append(line)
            try:
                sys.stderr.write(prefix + line + "\n")
                sys.stderr.flush()
            except (OSError, ValueError, AttributeError):
                pass  # our stderr is closed or absent: keep draining the pipe, or the engine blocks
