"""The sessions API's wire forms, shared by the gateway (which writes them) and `Cluster.connect`
(which reads them back): results, chunks, sessions and errors as JSON, and each error's status.

An error crosses HTTP as `{"error": {"type": <its class name>, "message": ...}}` with the status of
its kind, and the client raises the same class again (`errors.from_wire`), as openai's
`_make_status_error` does.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from dualpath_sdk import errors
from dualpath_sdk.api.result import Load, Persist, StepChunk, StepResult, Timings, Usage
from dualpath_sdk.api.session import Session
from dualpath_sdk.store.manifest import SessionManifest

# The status of each kind; a kind not named here takes its nearest named base's.
_STATUS: dict[type[errors.DualPathError], int] = {
    errors.InvalidInput: 400,
    errors.RequestTooLarge: 413,
    errors.AuthenticationError: 401,
    errors.PermissionDenied: 403,
    errors.SessionNotFound: 404,
    errors.SessionBusy: 409,
    errors.QueueFull: 429,
    errors.EngineUnavailable: 503,
    errors.StorageError: 503,
    errors.BufferTimeout: 503,
    errors.TransferError: 503,
    errors.StepTimeout: 504,
    errors.DualPathError: 500,
}
RETRY_AFTER_S = 1  # what a 429 (QueueFull) tells the caller to wait

# The server-sent events of a streamed step: its chunks, then its result or its error.
CHUNK, RESULT, ERROR = "chunk", "result", "error"


def status_of(exc: BaseException) -> int:
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return 500


def error_json(exc: BaseException) -> dict[str, Any]:
    """Ours say what went wrong; anything else is a bug, whose details stay in the server's log."""
    message = str(exc) if isinstance(exc, errors.DualPathError) else "internal error"
    return {"error": {"type": errors.kind_of(exc), "message": message}}


def error_from_json(status: int, body: object) -> errors.DualPathError:
    """The exception a gateway's error body stands for (a body of another shape: by its status)."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("type"), str):
        return errors.from_wire(error["type"], str(error.get("message", "")))
    by_status = {s: cls for cls, s in reversed(_STATUS.items())}
    return by_status.get(status, errors.DualPathError)(f"HTTP {status}: {str(body)[:200]}")


def result_json(result: StepResult) -> dict[str, Any]:
    return asdict(result)


def result_from_json(data: dict[str, Any]) -> StepResult:
    return StepResult(
        text=data["text"],
        token_ids=data["token_ids"],
        finish_reason=data["finish_reason"],
        usage=Usage(**data["usage"]),
        load=Load(**data["load"]),
        persist=Persist(**data["persist"]),
        timings=Timings(**data["timings"]),
        tool_calls=data["tool_calls"],
    )


def chunk_json(chunk: StepChunk) -> dict[str, Any]:
    return {"text": chunk.text, "token_ids": chunk.token_ids}


def chunk_from_json(data: dict[str, Any]) -> StepChunk:
    return StepChunk(data["text"], data["token_ids"])


def session_json(session: Session) -> dict[str, Any]:
    """A session's state as the client mirrors it (its block keys stay on the server)."""
    manifest = session._manifest
    return {
        **manifest.model_dump(mode="json", exclude={"block_keys"}),
        "token_count": len(manifest.token_ids),
    }


def session_from_json(data: dict[str, Any]) -> SessionManifest:
    fields = SessionManifest.model_fields.keys() - {"block_keys"}
    return SessionManifest.model_validate({k: data[k] for k in fields if k in data})
