"""One exception tree: callers catch by kind, never by message.

An error raised inside an engine process crosses the control channel as its kind (the class name)
and its message, and is raised again as the same class on the caller's side (`from_wire`), as
openai's `_make_status_error` maps a status back to its class. Only `EngineUnavailable` and
`TransferError` (an engine died, a peer vanished mid-transfer) are worth retrying elsewhere.
"""

from __future__ import annotations


class DualPathError(Exception):
    """Base of every error this SDK raises on purpose."""


class InvalidInput(DualPathError, ValueError):
    """A request, config or file the SDK cannot accept; nothing was changed."""


class ContextTooLong(InvalidInput):
    """The prompt plus max_tokens does not fit the model's context window or the engines' memory."""


class RequestTooLarge(InvalidInput):
    """A request body over the gateway's limit; it was not read."""


class AuthenticationError(DualPathError):
    """The gateway was called without an API key, or with one it does not know."""


class PermissionDenied(DualPathError):
    """The API key is valid but names another tenant than the one the request asks for."""


class SessionNotFound(DualPathError, KeyError):
    """No session manifest exists under that id."""

    def __str__(self) -> str:  # KeyError's would quote the message
        return str(self.args[0]) if self.args else ""


class SessionBusy(DualPathError):
    """Another step of the session is running (here or in another process), or another handle has
    advanced the session since this one loaded it: steps of one session are sequential."""


class EngineUnavailable(DualPathError):
    """No healthy engine could serve the request (engines died, or the cluster is closed)."""


class QueueFull(DualPathError):
    """The cluster already holds as many steps as it admits (`ClusterConfig.max_steps`): retry later.
    Nothing was submitted."""


class StepTimeout(DualPathError, TimeoutError):
    """A step made no progress for longer than the caller would wait; it was cancelled."""


class StorageError(DualPathError, OSError):
    """The persistent store failed (disk full, backend down); cached KV falls back to recompute."""


class ManifestCorrupt(StorageError):
    """A session manifest exists but cannot be trusted (damaged, truncated or of an unknown version)."""


class BufferTimeout(DualPathError, TimeoutError):
    """A host buffer stayed full for longer than the caller would wait."""


class TransferError(DualPathError):
    """A one-sided transfer failed or timed out (peer gone, region closed, link wait too long)."""


RETRYABLE = frozenset({"EngineUnavailable", "TransferError"})


def _kinds(base: type[DualPathError]) -> dict[str, type[DualPathError]]:
    found = {base.__name__: base}
    for sub in base.__subclasses__():
        found.update(_kinds(sub))
    return found


def kind_of(exc: BaseException) -> str:
    """The wire name of `exc`: its class for ours; "DualPathError" for anything else (a bug)."""
    return type(exc).__name__ if isinstance(exc, DualPathError) else "DualPathError"


def from_wire(kind: str, message: str) -> DualPathError:
    """The exception a wire error stands for; an unknown kind becomes the base class."""
    return _kinds(DualPathError).get(kind, DualPathError)(message)
