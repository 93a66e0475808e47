"""An engine process: one PE or DE ("one engine per GPU"), driven over the control channel.

The loop is nano-vllm's, and knows no role (vLLM v1's EngineCoreProc around its EngineCore): do one
unit of work (a DE decode step, a PE prefill batch) -> report -> pull -> take messages, each worker
behind the protocol of engine/worker.py. A PE pulls work (the paper's pull model): it keeps one `Fetch`
outstanding, which the cluster answers with the next request of its global queue once the scheduler
places it there (not while the PE holds more than beta tokens). Every engine sends a `Report` when its
figures change, so the scheduler decides on fresh figures, and a heartbeat thread repeats the
latest one every HEARTBEAT_S, also through a long prefill batch: the cluster notices an engine that
exited within seconds, and a hung one (its loop stalled for STALL_S, when the heartbeat stops)
soon after.

The launcher starts each engine as `python -m dualpath_sdk.engine` (`main` below): a fresh
interpreter that imports nothing of the user's program, so a cluster starts from a script without
a main guard, from `python -c`, from stdin, a REPL or a notebook kernel alike.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection

import torch

from dualpath_sdk.config import EngineConfig, SchedulerConfig, StoreConfig, TransferConfig
from dualpath_sdk.engine.core import kv_layout
from dualpath_sdk.engine.decode_worker import DecodeWorker, Send
from dualpath_sdk.engine.messages import Failed, Report, Role
from dualpath_sdk.engine.prefill_worker import PrefillWorker
from dualpath_sdk.engine.worker import Worker
from dualpath_sdk.errors import DualPathError
from dualpath_sdk.model.loader import Model, load_model
from dualpath_sdk.store import open_store
from dualpath_sdk.store.backend import BlockStore
from dualpath_sdk.transfer import Transport, open_transport

HEARTBEAT_S = 0.5
STALL_S = 60.0  # a loop iteration longer than this is a hung engine
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass(frozen=True)
class EngineSpec:
    """Everything an engine process needs, picklable (it reaches the process on its stdin)."""

    engine_id: str
    role: Role
    node: str
    model: str | None
    engine: EngineConfig
    store: StoreConfig
    transfer: TransferConfig
    buffer_slots: int
    threads: int
    scheduler: SchedulerConfig  # a PE packs its batches by the compute quota


class _Channel:
    """The control connection; sends come from the loop and from I/O threads."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()

    def send(self, message: object) -> None:
        with self.lock:
            self.conn.send(message)


class _Heartbeat(threading.Thread):
    """Resends the loop's latest report every HEARTBEAT_S, also while one long prefill batch runs.

    It falls silent once the loop has made no progress for STALL_S, so a hung engine is still found."""

    def __init__(self, channel: _Channel) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self.channel = channel
        self.report: Report | None = None
        self.progress = time.monotonic()
        self.stopped = threading.Event()

    def beat(self, report: Report) -> None:
        self.report, self.progress = report, time.monotonic()

    def run(self) -> None:
        while not self.stopped.wait(HEARTBEAT_S):
            if self.report is not None and time.monotonic() - self.progress < STALL_S:
                try:
                    self.channel.send(self.report)
                except OSError:
                    return

    def stop(self) -> None:
        self.stopped.set()


def main() -> None:
    """`python -m dualpath_sdk.engine`: run the engine that the launcher sends on stdin.

    One pickle arrives there: (the launcher's pid, the EngineSpec, the controller's address, the
    authkey); never on argv or in the environment, which other users can read in /proc."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the user's program; close ends us
    _die_with_parent()
    launcher_pid, spec, address, authkey = pickle.load(sys.stdin.buffer)
    if os.getppid() != launcher_pid:
        return  # the launcher died before the death signal was set
    engine_main(spec, address, authkey)


def _die_with_parent() -> None:
    """On Linux, SIGKILL from the kernel when the launcher dies: a killed program leaves no engine behind,
    not even one still loading its model (later, the control connection's EOF ends the engine too)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        prctl = ctypes.CDLL(None, use_errno=True).prctl
        prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def engine_main(spec: EngineSpec, address: tuple[str, int], authkey: bytes) -> None:
    torch.set_num_threads(spec.threads)
    model = load_model(spec.model, weights=spec.engine.weights)
    store = open_store(spec.store, node=spec.node)
    transport = open_transport(spec.transfer, node=spec.node)
    channel = _Channel(Client(address, authkey=authkey))
    worker = _worker(spec, model, store, transport, channel.send)
    channel.send(worker.hello(spec.node))
    heartbeat = _Heartbeat(channel)
    heartbeat.start()
    try:
        _serve(worker, channel, heartbeat)
    except (EOFError, OSError):
        return  # the cluster went away
    finally:
        heartbeat.stop()
        worker.close()
        transport.close()
        store.close()


def _worker(spec: EngineSpec, model: Model, store: BlockStore, transport: Transport, send: Send) -> Worker:
    """The spec's role, as the worker the loop drives."""
    if spec.role == "pe":
        layout = kv_layout(model, spec.engine.block_size, spec.engine.kv_dtype)
        max_tokens = spec.engine.max_batch_tokens
        return PrefillWorker(
            spec.engine_id, model, layout, store, transport, spec.buffer_slots, max_tokens, spec.scheduler
        )
    return DecodeWorker(spec.engine_id, model, spec.engine, store, transport, spec.buffer_slots, send)


def _serve(worker: Worker, channel: _Channel, heartbeat: _Heartbeat) -> None:
    """The loop, until the cluster's goodbye: one unit of work, the figures after it, then the messages."""
    last: Report | None = None
    while True:
        for message in worker.step():
            channel.send(message)
        report = worker.report()
        if report != last:  # the scheduler sees changes at once
            channel.send(report)
            last = report
        heartbeat.beat(report)
        for message in worker.pull():
            channel.send(message)
        if not _receive(worker, channel, wait=0.0 if worker.has_work else 0.01):
            return


def _receive(worker: Worker, channel: _Channel, wait: float) -> bool:
    """Handle the messages that came (waiting up to `wait` s for the first); False on the goodbye."""
    while channel.conn.poll(wait):
        message = channel.conn.recv()
        if message is None:  # the cluster's goodbye
            return False
        try:
            worker.handle(message)
        except Exception as exc:  # one request fails, the engine serves the others on
            if not isinstance(exc, DualPathError):  # a bug, not a bad request: show where
                traceback.print_exc()
            channel.send(Failed.of(getattr(message, "req_id", "?"), exc))
        wait = 0.0
    return True
