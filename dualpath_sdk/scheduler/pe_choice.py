"""Prefill-engine choice (PAPER.md, Scheduling: PE choice)."""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence

from dualpath_sdk.config import SchedulerConfig
from dualpath_sdk.scheduler.reports import EngineReport, Placement, Request, Thresholds


def derive_thresholds(
    config: SchedulerConfig, snic_tokens_per_s: float, prefill_tokens_per_s: float
) -> Thresholds:
    """Turn the configured seconds into token thresholds from measured storage and prefill rates."""
    return Thresholds(alpha=snic_tokens_per_s * config.alpha_s, beta=prefill_tokens_per_s * config.beta_s)


def choose_pe(
    queue: Iterable[Request], engines: Sequence[EngineReport], thresholds: Thresholds
) -> list[Placement]:
    """Place requests in FIFO order until no engine qualifies.

    Engines with tok_e > beta are skipped; engines whose node has read_q <= alpha are preferred (their SNIC
    has room), then the rest; within the preferred set the lowest tok_e wins (ties: report order).
    Each placement adds the request's tokens to the engine, which may push it over beta.
    """
    low: list[tuple[int, int]] = []
    high: list[tuple[int, int]] = []
    for i, e in enumerate(engines):
        if e.tok_e <= thresholds.beta:
            (low if e.read_q <= thresholds.alpha else high).append((e.tok_e, i))
    heapq.heapify(low)
    heapq.heapify(high)
    placements: list[Placement] = []
    for request in queue:
        heap = low or high
        if not heap:
            break
        tok, i = heapq.heappop(heap)
        placements.append(Placement(request, engines[i].engine_id))
        tok += request.tokens
        if tok <= thresholds.beta:
            heapq.heappush(heap, (tok, i))
    return placements
