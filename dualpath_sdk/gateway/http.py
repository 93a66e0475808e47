"""What every route shares: the request's JSON body, and errors as responses (ours, or OpenAI's
body on the OpenAI-compatible routes)."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from dualpath_sdk.api.wire import RETRY_AFTER_S, error_json, status_of
from dualpath_sdk.errors import ContextTooLong, InvalidInput, QueueFull

OPENAI_PATHS = ("/v1/chat/", "/v1/models")


def speaks_openai(path: str) -> bool:
    return path.startswith(OPENAI_PATHS)


async def body_json(request: Request) -> dict[str, Any]:
    """The request's JSON object, or InvalidInput."""
    raw = await request.body()
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise InvalidInput(f"the request body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidInput("the request body must be a JSON object")
    return body


def error_response(path: str, exc: BaseException) -> JSONResponse:
    status = status_of(exc)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if isinstance(exc, QueueFull) else None
    body = _openai_error(exc, status) if speaks_openai(path) else error_json(exc)
    return JSONResponse(body, status, headers=headers)


def _openai_error(exc: BaseException, status: int) -> dict[str, Any]:
    """OpenAI's error body: its type names the category, its code our kind (or OpenAI's own code)."""
    kinds = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error"}
    kinds |= {404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error"}
    kinds |= {429: "rate_limit_error"}
    code = "context_length_exceeded" if isinstance(exc, ContextTooLong) else error_json(exc)["error"]["type"]
    message = error_json(exc)["error"]["message"]
    return {
        "error": {"message": message, "type": kinds.get(status, "server_error"), "param": None, "code": code}
    }


def sse(data: dict[str, Any], event: str | None = None) -> bytes:
    """One server-sent event."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
