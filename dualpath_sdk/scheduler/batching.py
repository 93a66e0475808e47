"""Intra-PE compute-quota batching (PAPER.md, Scheduling: Inside a PE).

Data-parallel attention ranks wait for each other before the MoE/FFN step, so each rank packs about the
same attention time: requests FIFO up to the quota, the one that crosses it chunk-prefilled.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class AttentionModel:
    """t = a*new + b*new*(cached + new/2) + c: per-token work plus each new token attending its prefix."""

    a: float
    b: float
    c: float

    def time(self, cached: int, new: int) -> float:
        if new <= 0:
            return 0.0
        return self.a * new + self.b * new * (cached + new / 2) + self.c


def fit_attention_model(samples: Iterable[tuple[int, int, float]]) -> AttentionModel:
    """Least-squares fit of AttentionModel to measured (cached, new, seconds) samples."""
    rows = [(new, new * (cached + new / 2), 1.0, t) for cached, new, t in samples]
    if len(rows) < 3:
        raise ValueError("need at least 3 samples to fit 3 coefficients")
    data = np.asarray(rows, dtype=np.float64)
    coef, *_ = np.linalg.lstsq(data[:, :3], data[:, 3], rcond=None)
    return AttentionModel(float(coef[0]), float(coef[1]), float(coef[2]))


@dataclass(frozen=True, slots=True)
class PrefillWork:
    """A request waiting on a PE: `cached` tokens already have KV, `new` still need prefill."""

    request_id: Hashable
    cached: int
    new: int


@dataclass(frozen=True, slots=True)
class Chunk:
    """Prefill `tokens` of the request's new tokens in this batch; fewer than `new` means chunked."""

    request_id: Hashable
    tokens: int


def largest_chunk(model: AttentionModel, cached: int, new: int, budget_s: float) -> int:
    """Binary search the most new tokens whose attention time fits `budget_s` (time grows with tokens)."""
    lo, hi = 0, new
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if model.time(cached, mid) <= budget_s:
            lo = mid
        else:
            hi = mid - 1
    return lo


def pack_quota(queue: Iterable[PrefillWork], model: AttentionModel, quota_s: float) -> list[Chunk]:
    """Pack work FIFO up to `quota_s` of estimated attention time and chunk the request that crosses it.

    An empty batch always takes at least one token so a request bigger than the quota still progresses.
    """
    chunks: list[Chunk] = []
    used = 0.0
    for work in queue:
        t = model.time(work.cached, work.new)
        if used + t <= quota_s:
            chunks.append(Chunk(work.request_id, work.new))
            used += t
            continue
        tokens = largest_chunk(model, work.cached, work.new, quota_s - used)
        if tokens == 0 and not chunks:
            tokens = 1
        if tokens > 0:
            chunks.append(Chunk(work.request_id, tokens))
        break
    return chunks


def block_chunks(
    queue: Sequence[PrefillWork],
    model: AttentionModel,
    quota_s: float,
    block_tokens: int,
    max_blocks: int,
    max_tokens: int,
    min_tokens: int = 0,
) -> list[int]:
    """`pack_quota` for an engine whose KV moves in blocks: how far each leading request's prefill
    reaches this batch (cached + new tokens), FIFO.

    A chunk that is not a request's last ends on a block boundary, rounded down; a batch takes at
    least `min_tokens` of its first request (or all it has left), and at least up to the next
    boundary (a whole block, or the rest of a partial cached one). The batch also stays within
    `max_blocks` KV blocks (cached ones included) and `max_tokens` new tokens.
    """
    ends: list[int] = []
    blocks = new = 0
    for work, chunk in zip(queue, pack_quota(queue, model, quota_s), strict=False):
        total = work.cached + work.new
        tokens = chunk.tokens if ends else max(chunk.tokens, min(min_tokens, work.new))
        end = work.cached + min(tokens, max_tokens - new)
        if end < total:
            end = end // block_tokens * block_tokens
            if end <= work.cached:
                if ends:
                    break
                end = min((work.cached // block_tokens + 1) * block_tokens, total)
        nb = -(-end // block_tokens)
        if ends and (blocks + nb > max_blocks or new + end - work.cached > max_tokens):
            break
        ends.append(end)
        blocks, new = blocks + nb, new + end - work.cached
    return ends
