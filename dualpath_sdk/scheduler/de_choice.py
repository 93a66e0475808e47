"""Decode-engine choice, two levels (PAPER.md, Scheduling: DE choice)."""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import TypeVar

from dualpath_sdk.scheduler.reports import EngineReport, Placement, Request

G = TypeVar("G", bound=Hashable)


def choose_de_group(queue: Iterable[Request], group_tok: Mapping[G, int]) -> list[tuple[Request, G]]:
    """Level 1: each request goes to the DE group with the smallest sum of tok_e (ties: mapping order).

    The request's tokens join the group's sum at once, so one call spreads a burst over the groups.
    """
    heap = [(tok, i) for i, tok in enumerate(group_tok.values())]
    if not heap:
        return []
    groups = list(group_tok)
    heapq.heapify(heap)
    out: list[tuple[Request, G]] = []
    for request in queue:
        tok, i = heap[0]
        out.append((request, groups[i]))
        heapq.heapreplace(heap, (tok + request.tokens, i))
    return out


def choose_de(queue: Sequence[Request], engines: Sequence[EngineReport], slack: float) -> list[Placement]:
    """Level 2: walk a group's queue in order and place each request on one of its engines.

    R is the queue prefix that fits the group's free memory; Z = slack * (sum len(R) + sum tok_e) / |engines|
    is the balanced load with some slack. Among engines with memory for the request, those staying within Z
    are preferred by fewest requests (seq_e), which evens batch sizes; if none stays within Z the engine
    with the least tokens takes it. Walking stops at the first request no engine has memory for.
    """
    if not engines:
        return []
    free = [e.free_tokens for e in engines]
    tok = [e.tok_e for e in engines]
    seq = [e.seq_e for e in engines]
    room = sum(free)
    r_tokens = 0
    for request in queue:
        if request.de_memory_tokens > room:
            break
        room -= request.de_memory_tokens
        r_tokens += request.tokens
    z = slack * (r_tokens + sum(tok)) / len(engines)
    placements: list[Placement] = []
    for request in queue:
        need = request.de_memory_tokens
        fits = [i for i in range(len(engines)) if free[i] >= need]
        if not fits:
            break
        within = [i for i in fits if tok[i] + request.tokens <= z]
        best = min(within, key=lambda i: (seq[i], i)) if within else min(fits, key=lambda i: (tok[i], i))
        placements.append(Placement(request, engines[best].engine_id))
        free[best] -= need
        tok[best] += request.tokens
        seq[best] += 1
    return placements
