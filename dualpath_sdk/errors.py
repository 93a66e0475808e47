"""One exception tree: callers catch by kind, never by message."""


class DualPathError(Exception):
    """Base of every error this SDK raises on purpose."""


class InvalidInput(DualPathError, ValueError):
    """A request, config or file the SDK cannot accept; nothing was changed."""


class ContextTooLong(InvalidInput):
    """The prompt plus max_tokens does not fit the model's context window."""


class SessionNotFound(DualPathError, KeyError):
    """No session manifest exists under that id."""


class SessionBusy(DualPathError):
    """The session is already running a step; steps of one session are sequential."""


class EngineUnavailable(DualPathError):
    """No healthy engine could serve the request."""


class StorageError(DualPathError, OSError):
    """The persistent store failed (disk full, backend down); cached KV falls back to recompute."""


class ManifestCorrupt(StorageError):
    """A session manifest exists but cannot be trusted (damaged, truncated or of an unknown version)."""


class BufferTimeout(DualPathError, TimeoutError):
    """A host buffer stayed full for longer than the caller would wait."""


class TransferError(DualPathError):
    """A one-sided transfer failed or timed out (peer gone, region closed, link wait too long)."""
