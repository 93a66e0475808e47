"""dualpath-sdk: agent sessions whose KV-Cache is reloaded over both prefill and decode storage paths."""

from dualpath_sdk.api.cluster import Cluster
from dualpath_sdk.api.session import Load, Session, StepChunk, StepResult, Timings, Usage
from dualpath_sdk.config import ClusterConfig, EngineConfig, SchedulerConfig, StoreConfig, TransferConfig
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
    "Cluster",
    "ClusterConfig",
    "ContextTooLong",
    "DualPathError",
    "EngineConfig",
    "EngineUnavailable",
    "InvalidInput",
    "Load",
    "SchedulerConfig",
    "Session",
    "SessionBusy",
    "SessionNotFound",
    "StepChunk",
    "StepResult",
    "StorageError",
    "StoreConfig",
    "Timings",
    "TransferConfig",
    "Usage",
]
