"""Local engine processes: spawn one per PE/DE node, watch their health, respawn the dead."""

from __future__ import annotations

import multiprocessing
import secrets
import threading
import time
from multiprocessing.process import BaseProcess
from pathlib import Path

from dualpath_sdk.cluster.controller import Controller
from dualpath_sdk.config import ClusterConfig
from dualpath_sdk.engine.messages import Role
from dualpath_sdk.engine.process import HEARTBEAT_S, EngineSpec, engine_main
from dualpath_sdk.errors import EngineUnavailable

DEAD_AFTER_S = 10 * HEARTBEAT_S  # no heartbeat for this long: the engine is hung


class LocalLauncher:
    def __init__(self, config: ClusterConfig, model_path: str | None) -> None:
        self.config = config
        self._authkey = secrets.token_bytes(32)
        # node names key the nodes' shared NIC state (/dev/shm): another cluster must not share it
        self.tag = secrets.token_hex(4)
        self.controller = Controller(self._authkey, config)
        self._ctx = multiprocessing.get_context("spawn")
        self.specs = [self._spec(f"pe{i}", "pe", model_path) for i in range(config.prefill_nodes)]
        self.specs += [self._spec(f"de{i}", "de", model_path) for i in range(config.decode_nodes)]
        self.processes: dict[str, BaseProcess] = {}
        self._closing = threading.Event()
        for spec in self.specs:
            self._start(spec)
        try:
            self._wait_for_start(config.startup_timeout_s)
        except BaseException:
            self.close()
            raise
        self._health = threading.Thread(target=self._watch, name="engine-health", daemon=True)
        self._health.start()

    def _wait_for_start(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.controller.wait_for_engines(len(self.specs), timeout=1.0)
                return
            except EngineUnavailable:
                exited = [eid for eid, p in self.processes.items() if p.exitcode is not None]
                if exited or time.monotonic() > deadline:
                    why = f"engine processes {exited} exited while starting" if exited else "start timed out"
                    raise EngineUnavailable(f"the cluster did not start: {why}") from None

    def _spec(self, engine_id: str, role: Role, model_path: str | None) -> EngineSpec:
        c = self.config
        node = f"{self.tag}-{role}-node{engine_id[2:]}"
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
            c.scheduler.compute_quota_s,
        )

    def _start(self, spec: EngineSpec) -> None:
        process = self._ctx.Process(
            target=engine_main,
            args=(spec, self.controller.address, self._authkey),
            name=f"dualpath-{spec.engine_id}",
            daemon=True,
        )
        process.start()
        self.processes[spec.engine_id] = process

    def _watch(self) -> None:
        """Dead (exited, or silent for DEAD_AFTER_S): retry or fail its steps, then respawn it."""
        while not self._closing.wait(HEARTBEAT_S):
            seen = self.controller.last_seen()
            now = time.monotonic()
            for spec in self.specs:
                process = self.processes[spec.engine_id]
                silent = spec.engine_id in seen and now - seen[spec.engine_id] > DEAD_AFTER_S
                if process.is_alive() and not silent:
                    continue
                if spec.engine_id not in seen and process.is_alive():
                    continue  # still starting
                self.controller.engine_died(spec.engine_id)
                if process.is_alive():
                    process.kill()
                process.join(5)
                if not self._closing.is_set():
                    self._start(spec)

    def kill(self, engine_id: str) -> int:
        """SIGKILL one engine process (failure tests); returns its pid."""
        process = self.processes[engine_id]
        process.kill()
        assert process.pid is not None
        return process.pid

    @property
    def nodes(self) -> list[str]:
        return sorted({spec.node for spec in self.specs})

    def close(self) -> None:
        self._closing.set()
        self.controller.close()
        for process in self.processes.values():
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join(5)
        for directory in {Path("/dev/shm"), self.config.transfer.shm_dir}:
            for node in self.nodes:  # the nodes' emulated NIC state (storage limiter, link)
                for path in directory.glob(f"dualpath-*-{node}"):
                    path.unlink(missing_ok=True)
