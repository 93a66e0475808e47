"""The sessions API: a cluster's `Session`s over HTTP, in the wire forms of api/wire.py.

    POST   /v1/sessions                  create ({system, session_id, tenant, ttl_s})   201
    GET    /v1/sessions                  the tenant's session ids, oldest first
    GET    /v1/sessions/{id}             its state: messages, token ids and count, cached tokens and blocks
    DELETE /v1/sessions/{id}             close it: its blocks are unpinned, it stays resumable
    POST   /v1/sessions/{id}/fork        a new session sharing its blocks ({at}: up to a mark)   201
    POST   /v1/sessions/{id}/steps       one step ({messages} or {token_ids}, options, stream,
                                         expect_version): JSON, or server-sent events

Every route acts for one tenant (gateway/auth.py); another tenant's session is not found. Each
request resumes the session from its saved manifest, so any number of gateway workers, or a
restarted one, serve it alike; `expect_version` makes a stale client handle SessionBusy, as a
stale local handle is.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator
from functools import partial
from typing import Annotated, Any

import anyio
import anyio.to_thread
from pydantic import Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dualpath_sdk.api.cluster import Cluster
from dualpath_sdk.api.inputs import SessionOptions, StepOptions, _Strict, validated
from dualpath_sdk.api.result import StepChunk, StepResult
from dualpath_sdk.api.session import Session
from dualpath_sdk.api.wire import CHUNK, ERROR, RESULT, chunk_json, error_json, result_json, session_json
from dualpath_sdk.errors import DualPathError, SessionBusy
from dualpath_sdk.gateway.auth import tenant_for
from dualpath_sdk.gateway.http import SSE_HEADERS, body_json, sse

LEASE_WAIT_S = 2.0


class StepBody(_Strict):
    messages: Annotated[list[dict[str, Any]], Field(strict=False)] | None = None
    token_ids: Annotated[list[int], Field(strict=False)] | None = None
    options: Annotated[StepOptions, Field(strict=False)] = StepOptions()  # checked here, not as kwargs
    stream: bool = False
    expect_version: int | None = Field(default=None, ge=0)


class ForkBody(_Strict):
    at: int | None = Field(default=None, ge=0)


async def create(request: Request) -> Response:
    body = await body_json(request)
    tenant = tenant_for(request, body.pop("tenant", None))
    o = validated(SessionOptions, "session", {**body, "tenant": tenant})
    session = await anyio.to_thread.run_sync(partial(_cluster(request).session, **o.model_dump()))
    return JSONResponse(session_json(session), 201)


async def listing(request: Request) -> Response:
    tenant = tenant_for(request, request.query_params.get("tenant"))
    ids = await anyio.to_thread.run_sync(_cluster(request).sessions, tenant)
    return JSONResponse({"data": ids})


async def get(request: Request) -> Response:
    cluster, session = _cluster(request), await _resume(request)
    tokens = session.token_ids
    keys, cached = await anyio.to_thread.run_sync(cluster.cached_prefix, session.tenant, tokens, len(tokens))
    return JSONResponse({**session_json(session), "cached_tokens": cached, "cached_blocks": len(keys)})


async def close(request: Request) -> Response:
    session = await _resume(request)
    await session.aclose()
    return JSONResponse({"id": session.id, "closed": True})


async def fork(request: Request) -> Response:
    at = validated(ForkBody, "fork", await body_json(request)).at
    child = await (await _resume(request)).afork(at)
    return JSONResponse(session_json(child), 201)


async def step(request: Request) -> Response:
    body = validated(StepBody, "step", await body_json(request))
    session, events, first = await _start(request, body)
    if not body.stream:
        item = first
        while isinstance(item, StepChunk):
            item = await anext(events)
        return JSONResponse(_result(item, session))
    return StreamingResponse(
        _events(first, events, session), media_type="text/event-stream", headers=SSE_HEADERS
    )


async def _start(
    request: Request, body: StepBody
) -> tuple[Session, AsyncGenerator[StepChunk | StepResult, None], StepChunk | StepResult]:
    """The step started, and its first item: an error before it is still a status (409, 429, ...).

    A session whose lease is held is waited for a moment: a client that dropped a stream may send
    its next step before this server has seen the drop and cancelled the old one. A step that
    another handle ran meanwhile moves the version on, and the client's is then SessionBusy."""
    deadline = time.monotonic() + LEASE_WAIT_S
    while True:
        session = await _resume(request)
        if body.expect_version is not None and body.expect_version != session.version:
            raise SessionBusy(f"session {session.id} was stepped by another handle: resume it")
        options = body.options.model_dump(exclude_defaults=True)
        events = session.aevents(body.messages, body.token_ids, **options)
        try:
            return session, events, await anext(events)
        except SessionBusy:
            if time.monotonic() > deadline:
                raise
        await anyio.sleep(0.02)


async def _events(
    first: StepChunk | StepResult, events: AsyncGenerator[StepChunk | StepResult, None], session: Session
) -> AsyncIterator[bytes]:
    item = first
    try:
        while isinstance(item, StepChunk):
            yield sse(chunk_json(item), CHUNK)
            item = await anext(events)
        yield sse(_result(item, session), RESULT)
    except DualPathError as exc:
        yield sse(error_json(exc), ERROR)
    finally:
        await events.aclose()  # a client gone mid-step: the step is cancelled, the session unchanged


def _result(result: StepResult, session: Session) -> dict[str, Any]:
    return {"result": result_json(result), "session": session_json(session)}


def _cluster(request: Request) -> Cluster:
    cluster: Cluster = request.app.state.cluster
    return cluster


async def _resume(request: Request) -> Session:
    tenant = tenant_for(request, request.query_params.get("tenant"))
    resume = partial(_cluster(request).resume, request.path_params["session_id"], tenant)
    return await anyio.to_thread.run_sync(resume)


routes = [
    Route("/v1/sessions", create, methods=["POST"]),
    Route("/v1/sessions", listing, methods=["GET"]),
    Route("/v1/sessions/{session_id}", get, methods=["GET"]),
    Route("/v1/sessions/{session_id}", close, methods=["DELETE"]),
    Route("/v1/sessions/{session_id}/fork", fork, methods=["POST"]),
    Route("/v1/sessions/{session_id}/steps", step, methods=["POST"]),
]
