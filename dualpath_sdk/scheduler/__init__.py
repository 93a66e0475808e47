"""Pure scheduling policy: engine reports in, decisions out. No torch, no I/O, no clocks."""

from dualpath_sdk.scheduler.batching import (
    AttentionModel,
    Chunk,
    PrefillWork,
    block_chunks,
    fit_attention_model,
    largest_chunk,
    pack_quota,
)
from dualpath_sdk.scheduler.de import choose_de, choose_de_group
from dualpath_sdk.scheduler.pe import choose_pe, derive_thresholds
from dualpath_sdk.scheduler.policy import Scheduler
from dualpath_sdk.scheduler.read_plan import NO_READ, PlanKind, ReadPlan, pe_only, shorter_queue, split_read
from dualpath_sdk.scheduler.reports import EngineReport, Placement, Request, Role, Thresholds

__all__ = [
    "NO_READ",
    "AttentionModel",
    "Chunk",
    "EngineReport",
    "Placement",
    "PlanKind",
    "PrefillWork",
    "ReadPlan",
    "Request",
    "Role",
    "Scheduler",
    "Thresholds",
    "block_chunks",
    "choose_de",
    "choose_de_group",
    "choose_pe",
    "derive_thresholds",
    "fit_attention_model",
    "largest_chunk",
    "pack_quota",
    "pe_only",
    "shorter_queue",
    "split_read",
]
