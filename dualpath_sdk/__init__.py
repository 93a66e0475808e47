"""dualpath-sdk: agent sessions whose KV-Cache is reloaded over both prefill and decode storage paths."""

from dualpath_sdk.api.cluster import Cluster
from dualpath_sdk.api.remote import RemoteCluster
from dualpath_sdk.api.result import Load, Persist, StepChunk, StepResult, Timings, Usage
from dualpath_sdk.api.session import Session
from dualpath_sdk.config import ClusterConfig, EngineConfig, SchedulerConfig, StoreConfig, TransferConfig
from dualpath_sdk.errors import (
    AuthenticationError,
    BufferTimeout,
    ContextTooLong,
    DualPathError,
    EngineUnavailable,
    InvalidInput,
    ManifestCorrupt,
    PermissionDenied,
    QueueFull,
    RequestTooLarge,
    SessionBusy,
    SessionNotFound,
    StepTimeout,
    StorageError,
    TransferError,
)

__all__ = [
    "AuthenticationError",
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
    "PermissionDenied",
    "Persist",
    "QueueFull",
    "RemoteCluster",
    "RequestTooLarge",
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
