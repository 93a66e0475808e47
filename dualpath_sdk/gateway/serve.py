"""Serving the app with uvicorn: `in_thread` (tests, benchmarks, notebooks) and `serve`, the body of
`dualpath serve`.

`serve` refuses an address off loopback without API keys before it starts anything, starts the
cluster, then uvicorn, and prints one line with the URL once it listens. SIGINT or SIGTERM stops it
cleanly: uvicorn stops accepting, lets in-flight requests finish for `graceful_s` and cancels the
rest (a cancelled step leaves its session as it was), then the cluster is closed and `serve`
returns. A signal while the cluster starts stops the start and `serve` returns too.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from starlette.applications import Starlette

from dualpath_sdk.api.cluster import Cluster
from dualpath_sdk.errors import DualPathError, InvalidInput
from dualpath_sdk.gateway.app import MAX_BODY_BYTES, create_app
from dualpath_sdk.gateway.auth import Keys

LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
GRACEFUL_S = 10.0
SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def in_thread(app: Starlette, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `app` from a thread of this process until the block ends; yields its URL (port 0: a
    free port)."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="gateway", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the gateway did not start")
        thread.join(0.01)
    bound = server.servers[0].sockets[0].getsockname()
    try:
        yield f"http://{bound[0]}:{bound[1]}"
    finally:
        server.should_exit = True
        thread.join(30)


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine's loopback only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, keys: Keys | None) -> None:
    """InvalidInput for an address off loopback without keys: every caller could name any tenant."""
    if keys is None and not is_loopback(host):
        raise InvalidInput(
            f"refusing to serve on {host or 'every address'!r} without API keys: anyone who can reach it "
            "could read and step every tenant's sessions; give --api-key (or DUALPATH_API_KEY) or "
            "--keys-file, or bind a loopback address (127.0.0.1, ::1, localhost)"
        )


def url_of(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def announce_line(url: str) -> None:
    print(f"dualpath gateway listening on {url} (Ctrl+C or SIGTERM stops it)", flush=True)


def serve(
    host: str = "127.0.0.1",
    port: int = 8400,
    *,
    model: str | Path | None = None,
    prefill_nodes: int = 1,
    decode_nodes: int = 1,
    storage: str | Path | None = None,
    keys: Keys | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    graceful_s: float = GRACEFUL_S,
    announce: Callable[[str], None] = announce_line,
    ray_address: str | None = None,
    engines_per_node: int = 1,
    **overrides: Any,
) -> None:
    """Serve a new cluster's gateway on `host:port` (port 0: a free one) until SIGINT or SIGTERM;
    returns once the server stopped and the cluster is closed. The cluster is local, or on the Ray
    cluster at `ray_address` (Cluster.ray, with `engines_per_node`). `overrides`: any other
    ClusterConfig field (max_steps, engine, ...). Call it from the main thread (signals)."""
    check_exposure(host, keys)
    if engines_per_node != 1 and ray_address is None:
        raise InvalidInput("engines_per_node places a node's engines on one Ray node: it needs ray_address")
    if graceful_s < 0:
        raise InvalidInput(f"graceful_s must be >= 0, not {graceful_s}")
    stop, cluster = _Stop(), None
    with stop.installed():
        try:
            if ray_address is None:
                cluster = Cluster.local(model, prefill_nodes, decode_nodes, storage, **overrides)
            else:
                cluster = Cluster.ray(
                    ray_address, model, prefill_nodes, decode_nodes, engines_per_node, storage, **overrides
                )
            app = create_app(cluster, keys, max_body_bytes)
            config = uvicorn.Config(
                app,
                host=host,
                port=port,
                timeout_graceful_shutdown=graceful_s,  # type: ignore[arg-type]  # wait_for's timeout: a float
                lifespan="on",
                log_level="warning",
                access_log=False,
            )
            server = stop.server = _Server(config, announce)
            stop.starting = False  # from here on a signal asks the server to exit
            if not stop.signalled:
                _run(server, host, port)
        except _Interrupted:
            pass
        finally:
            if cluster is not None:
                cluster.close()


def _run(server: uvicorn.Server, host: str, port: int) -> None:
    quiet, log = _QuietCancel(), logging.getLogger("uvicorn.error")
    log.addFilter(quiet)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn's way to fail its start (it logged why)
        if server.started:
            raise
        raise DualPathError(f"the gateway could not listen on {url_of(host, port)} (see above)") from exc
    finally:
        log.removeFilter(quiet)


class _QuietCancel(logging.Filter):
    """Drops uvicorn's traceback of each request cancelled past the grace: expected, and uvicorn
    logs how many it cancelled."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError))


class _Interrupted(BaseException):
    """A signal while the cluster starts: unwinds the start (the launcher stops what it started)."""


class _Stop:
    """Our SIGINT/SIGTERM handlers around the whole of `serve`.

    While the cluster starts, a signal raises _Interrupted. Once it runs, uvicorn installs its own
    handlers for as long as it serves; ours, restored after, take the signal uvicorn raises again
    once it has shut down (its `capture_signals`), and any later one while the cluster closes,
    and ask the server to exit: the process then ends by returning, not by the signal."""

    def __init__(self) -> None:
        self.starting = True
        self.signalled = False
        self.server: uvicorn.Server | None = None

    def handle(self, sig: int, frame: FrameType | None) -> None:
        self.signalled = True
        if self.server is not None:
            self.server.should_exit = True
        if self.starting:
            self.starting = False  # a second signal while unwinding does not interrupt the cleanup
            raise _Interrupted(sig)

    @contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("serve() handles SIGINT and SIGTERM: call it from the main thread")
        previous = {sig: signal.signal(sig, self.handle) for sig in SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class _Server(uvicorn.Server):
    """uvicorn's server, announcing its URL once it listens."""

    def __init__(self, config: uvicorn.Config, announce: Callable[[str], None]) -> None:
        super().__init__(config)
        self._announce = announce

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            port = self.servers[0].sockets[0].getsockname()[1]
            self._announce(url_of(self.config.host, port))
