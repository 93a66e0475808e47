"""The control channel's cluster end: one connection per engine process, read by its own thread
and written by its own sender thread, so that a dead or slow engine's socket never blocks the
holder of the controller's lock. A send to a dead engine is dropped: the launcher's health check
finds the engine dead and the controller retries its steps.
"""

from __future__ import annotations

import contextlib
import enum
import queue
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, Listener
from multiprocessing.reduction import ForkingPickler

from dualpath_sdk.engine.messages import Hello, Report


class _End(enum.Enum):
    GOODBYE = "goodbye"  # the cluster closes: say goodbye, keep the connection as it is
    CLOSE = "close"  # the engine died: close the connection


class EngineLink:
    """One engine as the controller knows it: its Hello, its latest figures, and its connection."""

    def __init__(self, hello: Hello, conn: Connection) -> None:
        self.hello = hello
        self.conn = conn
        self.report: Report | None = None
        self.last_seen = time.monotonic()
        self.fetching = False  # it asked for work (Fetch) and has been given none since
        self.alive = True
        self._outbox: queue.SimpleQueue[bytes | _End] = queue.SimpleQueue()
        threading.Thread(target=self._write, name=f"controller-send-{hello.engine_id}", daemon=True).start()

    def send(self, message: object) -> None:
        """Queue a message, pickled now, so that it says what holds now; the sender writes it."""
        self._outbox.put(bytes(ForkingPickler.dumps(message)))

    def goodbye(self) -> None:
        """The engine's loop ends on None; nothing follows it."""
        self.send(None)
        self._outbox.put(_End.GOODBYE)

    def close(self) -> None:
        """The engine is dead: the connection closes once what was queued has been tried."""
        self.alive = False
        self._outbox.put(_End.CLOSE)

    def _write(self) -> None:
        while not isinstance(item := self._outbox.get(), _End):
            with contextlib.suppress(OSError):  # a dead engine: the health check retries its steps
                self.conn.send_bytes(item)
        if item is _End.CLOSE:
            self.conn.close()


class Connections:
    """Accepts engines and reads their messages, each engine on its own thread: `on_hello` and
    `on_message` run under `lock`. It listens on `host`: loopback for engines of this machine, the
    driver's node address when engines dial in from other hosts (cluster mode)."""

    def __init__(
        self,
        authkey: bytes,
        lock: threading.RLock,
        on_hello: Callable[[EngineLink], None],
        on_message: Callable[[EngineLink, object], None],
        host: str = "127.0.0.1",
    ) -> None:
        self.listener = Listener((host, 0), authkey=authkey)
        self.address: tuple[str, int] = self.listener.address
        self.engines: dict[str, EngineLink] = {}  # by engine id: the latest process of each
        self._lock = lock
        self._on_hello = on_hello
        self._on_message = on_message
        self._closed = False

    def start(self) -> None:
        threading.Thread(target=self._accept, name="controller-accept", daemon=True).start()

    def send(self, engine_id: str, message: object) -> None:
        self.engines[engine_id].send(message)

    def alive(self, role: str) -> list[EngineLink]:
        return [e for e in self.engines.values() if e.alive and e.hello.role == role]

    def goodbye(self) -> None:
        for engine in self.engines.values():
            if engine.alive:
                engine.goodbye()

    def close(self) -> None:
        self._closed = True
        self.listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: Connection) -> None:
        try:
            hello = conn.recv()
        except (EOFError, OSError):
            return
        assert isinstance(hello, Hello)
        engine_id = hello.engine_id
        link = EngineLink(hello, conn)
        with self._lock:
            replaced = self.engines.get(engine_id)
            if replaced is not None and replaced.alive:
                replaced.close()  # its sender thread ends with it
            self.engines[engine_id] = link
            self._on_hello(link)
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return  # the health check decides whether the engine is dead
            with self._lock:
                if self.engines.get(engine_id) is not link:
                    return
                link.last_seen = time.monotonic()
                self._on_message(link, message)
