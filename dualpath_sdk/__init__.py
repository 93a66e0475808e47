"""dualpath-sdk: agent sessions whose KV-Cache is reloaded over both prefill and decode storage paths."""

from dualpath_sdk.config import EngineConfig, SchedulerConfig
from dualpath_sdk.errors import (
    ContextTooLong,
    DualPathError,
    EngineUnavailable,
    InvalidInput,
    SessionBusy,
    SessionNotFound,
    StorageError,
)

__all__ = [
    "ContextTooLong",
    "DualPathError",
    "EngineConfig",
    "EngineUnavailable",
    "InvalidInput",
    "SchedulerConfig",
    "SessionBusy",
    "SessionNotFound",
    "StorageError",
]
