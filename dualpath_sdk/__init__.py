"""dualpath-sdk: agent sessions whose KV-Cache is reloaded over both prefill and decode storage paths."""

from dualpath_sdk.api.cluster import Cluster
from dualpath_sdk.api.result import Load, Persist, StepChunk, StepResult, Timings, Usage
from dualpath_sdk.api.session import Session
from dualpath_sdk.config import ClusterConfig, EngineConfig, SchedulerConfig, StoreConfig, TransferConfig
from dualpath_sdk.errors import (
    BufferTimeout,
    ContextTooLong,
    DualPathError,
    EngineUnavailable,
    InvalidInput,
    ManifestCorrupt,
    SessionBusy,
    SessionNotFound,
    StepTimeout,
    StorageError,
    TransferError,
)

__all__ = [
    "BufferTimeout",
    "Cluster",
    "ClusterConfig",
    "ContextTooLong",
    "DualPathError",
    "EngineConfig",
    "EngineUnavailable",
    "InvalidInput",
    "Load",
    "ManifestCorrupt",
    "Persist",
    "SchedulerConfig",
    "Session",
    "SessionBusy",
    "SessionNotFound",
    "StepChunk",
    "StepResult",
    "StepTimeout",
    "StorageError",
    "StoreConfig",
    "Timings",
    "TransferConfig",
    "TransferError",
    "Usage",
]
