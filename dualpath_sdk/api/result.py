"""What a step returns: the StepResult of a whole turn, and the StepChunks a stream yields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose KV was loaded, not computed
    completion_tokens: int


@dataclass(frozen=True)
class Load:
    plan: str  # "none" | "pe" | "de" | "split"
    bytes_pe: int  # KV read from storage through the PE node
    bytes_de: int  # ... and through the DE node


@dataclass(frozen=True)
class Persist:
    blocks: int  # Full Blocks of this step written to the store
    failed: int  # ... that failed to persist (counted and logged; the next turn recomputes them)


@dataclass(frozen=True)
class Timings:
    queue_s: float
    read_s: float
    prefill_s: float
    ttft_s: float
    decode_s: float
    tpot_s: float


@dataclass(frozen=True)
class StepResult:
    text: str  # the reply, without the tool-call markup and cut at a stop string
    token_ids: list[int]
    finish_reason: str  # "stop", "length" or "tool_calls"
    usage: Usage
    load: Load
    persist: Persist
    timings: Timings
    tool_calls: list[dict[str, Any]] = field(
        default_factory=list
    )  # [{"id", "type", "function": {"name", "arguments"}}]


@dataclass(frozen=True)
class StepChunk:
    text: str
    token_ids: list[int]
