"""The gateway's ASGI app: a cluster's sessions over HTTP, and an OpenAI-compatible endpoint.

Routes (DESIGN.md, Gateway): the sessions API (gateway/sessions.py), `/v1/chat/completions` and
`/v1/models` (gateway/completions.py), `/health` and `/metrics`. Every error is JSON with a stable
type per error class and its status (api/wire.py); the OpenAI routes answer in OpenAI's error body.
Request bodies are capped; steps beyond the cluster's `max_steps` are 429 with Retry-After.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dualpath_sdk.api.cluster import Cluster
from dualpath_sdk.errors import DualPathError, RequestTooLarge
from dualpath_sdk.gateway import completions, sessions
from dualpath_sdk.gateway.auth import Keys, tenant_for
from dualpath_sdk.gateway.http import error_response

MAX_BODY_BYTES = 8 << 20
log = logging.getLogger(__name__)


def create_app(cluster: Cluster, keys: Keys | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> Starlette:
    """The app over a running cluster (the caller owns and closes the cluster). `keys`: None lets
    every caller name its tenant, which only a loopback gateway may allow (`dualpath serve`)."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # every step's waits run in worker threads: let the cluster's whole admission run at once
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, cluster.config.max_steps + 16)
        yield

    app = Starlette(
        routes=[
            Route("/health", health),
            Route("/metrics", metrics),
            *sessions.routes,
            *completions.routes,
        ],
        middleware=[Middleware(BodyLimit, max_bytes=max_body_bytes)],
        exception_handlers={DualPathError: _on_error, HTTPException: _on_http_error, Exception: _on_bug},
        lifespan=lifespan,
    )
    app.state.cluster = cluster
    app.state.keys = keys
    return app


async def health(request: Request) -> Response:
    """Liveness, and whether every engine is up (503 while one is not)."""
    engines = request.app.state.cluster.health()
    up = bool(engines) and all(engines.values())
    return JSONResponse({"status": "ok" if up else "degraded", "engines": engines}, 200 if up else 503)


async def metrics(request: Request) -> Response:
    tenant_for(request, None)  # with keys, the operator's counters need a key too
    registry = request.app.state.cluster.metrics()
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


async def _on_error(request: Request, exc: Exception) -> Response:
    return error_response(request.url.path, exc)


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    body = {"error": {"type": "NotFound" if exc.status_code == 404 else "HTTPError", "message": exc.detail}}
    return JSONResponse(body, exc.status_code, headers=exc.headers)


async def _on_bug(request: Request, exc: Exception) -> Response:
    log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(request.url.path, exc)


class BodyLimit:
    """413 for a body over `max_bytes`: by its Content-Length before it is read, else as it
    arrives (a chunked body is cut off at the limit, never buffered whole)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = RequestTooLarge(f"the request body exceeds the limit of {self.max_bytes} bytes")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await error_response(scope["path"], too_large)(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise too_large
            return message

        await self.app(scope, limited, send)
