"""The controller: the cluster's side of the control channel and the caller's way in.

It wires three parts, all run under its lock: the engines' connections (connections.py), the
steps and the queues they wait in (steps.py: a step's state machine, retries, outcomes), and
placement through scheduler's pipeline (placement.py). Waiting steps are placed on every event that
can make room or work for them: a submit, a retry, a cancel, an engine's Hello, Report or Fetch.
"""

from __future__ import annotations

import queue
import threading
import time

from dualpath_sdk.cluster.connections import Connections, EngineLink
from dualpath_sdk.cluster.metrics import Metrics
from dualpath_sdk.cluster.placement import Placer
from dualpath_sdk.cluster.steps import Event, StepMachine, StepOutcome, StepRequest
from dualpath_sdk.config import ClusterConfig
from dualpath_sdk.engine.messages import Fetch, Report
from dualpath_sdk.errors import EngineUnavailable, InvalidInput, QueueFull

__all__ = ["Controller", "Event", "StepOutcome", "StepRequest"]


class Controller:
    def __init__(self, authkey: bytes, config: ClusterConfig, host: str = "127.0.0.1") -> None:
        """`host`: where the control channel listens (connections.py)."""
        self.config = config
        self.block_size = config.engine.block_size
        self.lock = threading.RLock()
        self.engine_ready = threading.Condition(self.lock)
        self.metrics = Metrics()
        self.placer = Placer(config)
        self.connections = Connections(authkey, self.lock, self._on_hello, self._on_message, host)
        self.address: tuple[str, int] = self.connections.address
        self.engines: dict[str, EngineLink] = self.connections.engines
        self.machine = StepMachine(config, self.connections, self.metrics, self._dispatch)
        self.steps = self.machine.steps
        self.connections.start()

    # ---- the caller's side --------------------------------------------------------------------

    def submit(self, request: StepRequest) -> tuple[str, queue.Queue[Event]]:
        """Queue a step. Events: token lists as they come, then a StepOutcome or the error."""
        cached, bs = request.prefix_tokens(self.block_size), self.block_size
        if -(-cached // bs) != len(request.keys) or cached >= max(len(request.token_ids), 1):
            raise InvalidInput(
                f"a cached prefix of {cached} tokens in {len(request.keys)} blocks of {bs} "
                f"for a prompt of {len(request.token_ids)}"
            )
        with self.lock:
            if self.machine.closed:
                raise EngineUnavailable("the cluster is closed")
            if len(self.steps) >= self.config.max_steps:
                self.metrics.queue_full.inc()
                raise QueueFull(f"the cluster holds {len(self.steps)} steps, its limit: retry later")
            step = self.machine.add(request)
            self._dispatch()
            return step.req_id, step.events

    def cancel(self, req_id: str) -> None:
        with self.lock:
            self.machine.cancel(req_id)

    def stop(self, req_id: str) -> None:
        """End a decoding step now, as finished on a stop the caller found (a stop string): the
        engines drop it and the caller's next event is its outcome."""
        with self.lock:
            self.machine.stop(req_id)

    def wait_for_engines(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.lock:
            while sum(e.alive for e in self.engines.values()) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise EngineUnavailable(
                        f"only {len(self.engines)} of {count} engines started in {timeout} s"
                    )
                self.engine_ready.wait(left)

    def engine_died(self, engine_id: str) -> None:
        """Called by the launcher's health check: retry or fail every step that still needs the
        engine. A step already decoding needs only its DE: its PE's death leaves it streaming."""
        with self.lock:
            engine = self.engines.get(engine_id)
            if engine is None or not engine.alive:
                return
            engine.close()
            self.machine.engine_died(engine_id)

    def last_seen(self) -> dict[str, float]:
        with self.lock:
            return {eid: e.last_seen for eid, e in self.engines.items() if e.alive}

    def close(self) -> None:
        """Fail every unfinished step at once, and say goodbye to the engines."""
        with self.lock:
            self.machine.close()
            self.connections.goodbye()
        self.connections.close()

    # ---- the engines' side (under self.lock) ----------------------------------------------------

    def _on_hello(self, engine: EngineLink) -> None:
        self.placer.engine_joined(engine.hello)
        self.engine_ready.notify_all()
        self._dispatch()  # steps may be waiting for this engine (a respawned DE, say)

    def _on_message(self, engine: EngineLink, message: object) -> None:
        """An engine's figures feed placement; any other message is about one step."""
        match message:
            case Report():
                engine.report = message
                h = engine.hello
                self.metrics.engine_report(h.engine_id, h.role, message)
                self._dispatch()  # a step waiting for beta or DE memory may fit now
            case Fetch():
                engine.report = message.report
                engine.fetching = True
                self._dispatch()
            case _:
                self.machine.on_message(message)

    def _dispatch(self) -> None:
        self.placer.place(self.machine, self.connections)
