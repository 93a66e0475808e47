"""Placement: the global queue and the engines' figures in, decisions out (a step, its PE, its DE,
its read plan), through the paper's scheduler. The caller starts each placed step on its engines.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, replace

from dualpath_sdk.cluster.connections import EngineLink
from dualpath_sdk.cluster.steps import Step
from dualpath_sdk.config import ClusterConfig, Mode
from dualpath_sdk.engine.messages import Hello, Report
from dualpath_sdk.scheduler import (
    NO_READ,
    EngineReport,
    ReadPlan,
    Request,
    Scheduler,
    Thresholds,
    derive_thresholds,
    pe_only,
    split_read,
)


@dataclass(frozen=True)
class Decision:
    """A step placed: its PE, its DE, and which side reads which of its cached blocks."""

    step: Step
    pe: str
    de: str
    plan: ReadPlan


class Placement:
    """Chooses where queued steps go, in global FIFO order, and counts each choice in the chosen
    engines' figures until their next reports say it themselves."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.block_size = config.engine.block_size
        self.mode: Mode = config.mode
        self.scheduler: Scheduler | None = None  # made when the first PE has profiled itself

    def engine_joined(self, hello: Hello) -> None:
        if self.scheduler is None and hello.attention is not None:
            self.scheduler = Scheduler(
                self.config.scheduler, Thresholds(math.inf, math.inf), hello.attention, self.mode
            )

    def place(self, queue: deque[Step], engines: Mapping[str, EngineLink]) -> list[Decision]:
        """Take queued steps off the queue's head for fetching PEs: PE choice, then the DE group and
        the DE in it, then the read plan. A step the scheduler cannot place (every fetching PE over
        beta, no DE memory) stays at the head, for the next report."""
        decisions: list[Decision] = []
        while queue and self.scheduler is not None:
            pes = [e for e in _alive(engines, "pe") if e.fetching]
            des = [e for e in _alive(engines, "de") if e.report is not None]
            if not pes or not des:
                break
            self.scheduler.thresholds = self._thresholds(engines)
            step = queue[0]
            request = self._request(step)
            placed = self.scheduler.choose_pe([request], [_report(e, engines) for e in pes])
            if not placed:
                break
            pe = engines[str(placed[0].engine_id)]
            de = self._choose_de(request, des, engines)
            if de is None:
                break
            queue.popleft()
            plan = self._plan(step, pe, de, engines)
            cached, split = request.cached_tokens, plan.pe_blocks
            pe_tokens = min(split * self.block_size, cached)  # the DE side reads the blocks after split
            _charge(pe, request.tokens, pe_tokens, 0)
            _charge(de, request.tokens, cached - pe_tokens, request.de_memory_tokens)
            pe.fetching = False
            decisions.append(Decision(step=step, pe=pe.hello.engine_id, de=de.hello.engine_id, plan=plan))
        return decisions

    def _choose_de(
        self, request: Request, des: list[EngineLink], engines: Mapping[str, EngineLink]
    ) -> EngineLink | None:
        """The DE group (node) with the fewest tokens, then the DE inside it (memory, Z slack)."""
        assert self.scheduler is not None
        groups: dict[str, list[EngineLink]] = {}
        for e in des:
            groups.setdefault(e.hello.node, []).append(e)
        group_tok = {node: sum(_report(e, engines).tok_e for e in group) for node, group in groups.items()}
        [(_, node)] = self.scheduler.choose_de_group([request], group_tok)
        group = groups[node]
        placed = self.scheduler.choose_de([request], [_report(e, engines) for e in group])
        if placed:
            return engines[str(placed[0].engine_id)]
        if all(_report(e, engines).seq_e == 0 for e in group):
            return group[0]  # bigger than an idle DE's memory: let the DE refuse it (ContextTooLong)
        return None

    def _plan(
        self, step: Step, pe: EngineLink, de: EngineLink, engines: Mapping[str, EngineLink]
    ) -> ReadPlan:
        """The read side: forced per step, or the scheduler's (shorter queue, or split by drain rate)."""
        assert self.scheduler is not None
        cached = len(step.request.keys)  # blocks, the last one partial where the tokens end inside it
        forced = step.request.plan
        if self.mode != "dualpath" or forced == "pe":
            return pe_only(cached)  # basic reads on the PE side only; oracle skips the reads it is given
        if forced == "de":
            return ReadPlan(kind="de", pe_blocks=0, de_blocks=cached) if cached else NO_READ
        # every node's SNIC has the configured rate, so the split depends on the queues alone
        args = (cached, self.block_size, _node_read_q(pe, engines), _node_read_q(de, engines), 1.0, 1.0)
        tokens = step.request.prefix_tokens(self.block_size)
        if forced == "auto":
            return self.scheduler.plan_read(*args, cached_tokens=tokens)
        plan = split_read(*args, cached_tokens=tokens)
        if plan.kind != "split" and cached >= 2:  # forced: both sides read, whatever the queues say
            plan = ReadPlan(kind="split", pe_blocks=cached // 2, de_blocks=cached - cached // 2)
        return plan

    # ---- what the scheduler sees ----------------------------------------------------------------

    def _request(self, step: Step) -> Request:
        r = step.request
        return Request(
            request_id=step.req_id,
            tokens=len(r.token_ids),
            cached_tokens=r.prefix_tokens(self.block_size),
            decode_tokens=r.params.max_tokens,
        )

    def _snic_tps(self, engines: Mapping[str, EngineLink]) -> float:
        """Tokens/s one storage NIC reads: the configured cap, else the fastest rate measured so far."""
        per_token = next(iter(engines.values())).hello.kv_bytes_per_token
        if self.config.store.snic_read_bps is not None:
            return self.config.store.snic_read_bps / per_token
        measured = [e.report.read_tps for e in engines.values() if e.report and e.report.read_tps > 0]
        return max(measured, default=math.inf)

    def _thresholds(self, engines: Mapping[str, EngineLink]) -> Thresholds:
        """alpha and beta from the measured storage rate and the PEs' profiled prefill rates."""
        rates = [e.hello.prefill_tps for e in _alive(engines, "pe") if e.hello.prefill_tps > 0]
        prefill = sum(rates) / len(rates) if rates else math.inf
        return derive_thresholds(self.config.scheduler, self._snic_tps(engines), prefill)


def _alive(engines: Mapping[str, EngineLink], role: str) -> list[EngineLink]:
    return [e for e in engines.values() if e.alive and e.hello.role == role]


def _report(engine: EngineLink, engines: Mapping[str, EngineLink]) -> EngineReport:
    r = engine.report or _no_report(engine)
    h = engine.hello
    return EngineReport(
        engine_id=h.engine_id,
        node_id=h.node,
        role=h.role,
        seq_e=r.seq,
        tok_e=r.tokens,
        read_q=_node_read_q(engine, engines),
        free_tokens=r.free_tokens,
    )


def _no_report(engine: EngineLink) -> Report:
    return Report(engine_id=engine.hello.engine_id, seq=0, tokens=0, read_q=0)


def _node_read_q(engine: EngineLink, engines: Mapping[str, EngineLink]) -> int:
    """Engines of one node share its storage NIC, so its read queue is theirs together."""
    node = engine.hello.node
    same = [e for e in engines.values() if e.alive and e.hello.node == node]
    return sum(e.report.read_q for e in same if e.report is not None)


def _charge(engine: EngineLink, tokens: int, reads: int, memory: int) -> None:
    """Count a placement in the engine's figures until its next report says it itself."""
    r = engine.report or _no_report(engine)
    engine.report = replace(
        r,
        seq=r.seq + 1,
        tokens=r.tokens + tokens,
        read_q=r.read_q + reads,
        free_tokens=r.free_tokens - memory,
    )
