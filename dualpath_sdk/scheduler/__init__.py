"""Pure scheduling policy, and the placement pipeline that asks it in the paper's order: engine reports
in, decisions out. No torch, no I/O, no clocks."""

from dualpath_sdk.scheduler.batching import (
    AttentionModel,
    Chunk,
    PrefillWork,
    block_chunks,
    fit_attention_model,
    largest_chunk,
    pack_quota,
)
from dualpath_sdk.scheduler.de_choice import choose_de, choose_de_group
from dualpath_sdk.scheduler.pe_choice import choose_pe, derive_thresholds
from dualpath_sdk.scheduler.pipeline import Decision, Pass, Pipeline, Reports, Snapshot, Waiting
from dualpath_sdk.scheduler.policy import Scheduler
from dualpath_sdk.scheduler.read_plan import (
    NO_READ,
    PlanKind,
    ReadPlan,
    de_only,
    pe_only,
    shorter_queue,
    split_read,
)
from dualpath_sdk.scheduler.reports import EngineReport, Placement, Request, Role, Thresholds

__all__ = [
    "NO_READ",
    "AttentionModel",
    "Chunk",
    "Decision",
    "EngineReport",
    "Pass",
    "Pipeline",
    "Placement",
    "PlanKind",
    "PrefillWork",
    "ReadPlan",
    "Reports",
    "Request",
    "Role",
    "Scheduler",
    "Snapshot",
    "Thresholds",
    "Waiting",
    "block_chunks",
    "choose_de",
    "choose_de_group",
    "choose_pe",
    "de_only",
    "derive_thresholds",
    "fit_attention_model",
    "largest_chunk",
    "pack_quota",
    "pe_only",
    "shorter_queue",
    "split_read",
]
