"""Read plan: which side's SNIC reads a request's cached Full Blocks (PAPER.md, Scheduling: Read side)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PlanKind = Literal["none", "pe", "de", "split"]


@dataclass(frozen=True, slots=True)
class ReadPlan:
    """How many cached blocks each side reads; in a split the PE side reads the leading `pe_blocks`."""

    kind: PlanKind
    pe_blocks: int
    de_blocks: int


NO_READ = ReadPlan("none", 0, 0)


def _one_side(cached_blocks: int, pe: bool) -> ReadPlan:
    return ReadPlan("pe", cached_blocks, 0) if pe else ReadPlan("de", 0, cached_blocks)


def pe_only(cached_blocks: int) -> ReadPlan:
    """The classic path (basic mode): the PE node's SNIC reads everything."""
    return _one_side(cached_blocks, True) if cached_blocks > 0 else NO_READ


def de_only(cached_blocks: int) -> ReadPlan:
    """The DE node's SNIC reads everything (a step may ask for it)."""
    return _one_side(cached_blocks, False) if cached_blocks > 0 else NO_READ


def shorter_queue(cached_blocks: int, pe_read_q: float, de_read_q: float) -> ReadPlan:
    """The paper's rule: the side whose node has the shorter read queue reads everything (ties: PE)."""
    if cached_blocks <= 0:
        return NO_READ
    return _one_side(cached_blocks, pe_read_q <= de_read_q)


def split_read(
    cached_blocks: int,
    block_tokens: int,
    pe_read_q: float,
    de_read_q: float,
    pe_rate: float,
    de_rate: float,
    cached_tokens: int | None = None,
) -> ReadPlan:
    """Divide the blocks so both queues drain at the same moment (water-filling).

    With queues q and drain rates r (tokens, tokens/s), both sides finish at T = (q_pe + q_de + C) /
    (r_pe + r_de) when the PE side reads T * r_pe - q_pe tokens; clamped, that degenerates to one side
    when the other queue alone is longer than T. C is `cached_tokens` (default: whole blocks): the
    last block may be a partial one, read at its tokens' cost (the DE side reads it in a split).
    """
    if cached_blocks <= 0:
        return NO_READ
    total = cached_blocks * block_tokens if cached_tokens is None else cached_tokens
    finish = (pe_read_q + de_read_q + total) / (pe_rate + de_rate)
    pe_blocks = min(cached_blocks, max(0, round((finish * pe_rate - pe_read_q) / block_tokens)))
    if pe_blocks in (0, cached_blocks):
        return _one_side(cached_blocks, pe_blocks == cached_blocks)
    return ReadPlan("split", pe_blocks, cached_blocks - pe_blocks)
