"""Placement: the engines' figures in, as the placement pipeline's reports (scheduler/pipeline.py, the
simulator's too), and its pass out, as the steps' moves: into a DE group's queue, then started on their
PE and DE with a read plan. The one place in cluster/ that speaks the scheduler's language.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import replace

from dualpath_sdk.cluster.connections import Connections, EngineLink
from dualpath_sdk.cluster.steps import Step, StepMachine
from dualpath_sdk.config import ClusterConfig
from dualpath_sdk.engine.messages import Hello, Report
from dualpath_sdk.scheduler import (
    EngineReport,
    Pipeline,
    Request,
    Scheduler,
    Snapshot,
    Thresholds,
    Waiting,
    derive_thresholds,
)


class Placer:
    """One pipeline pass per event that can make room or work: PE choice over the global queue for
    fetching PEs, each placed step into its DE group's queue, every group's queue walked for its DEs,
    then the read plans. Each start is counted in the chosen engines' figures until their next reports
    say it themselves."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.block_size = config.engine.block_size
        self.pipeline: Pipeline | None = None  # made when the first PE has profiled itself

    def engine_joined(self, hello: Hello) -> None:
        if self.pipeline is None and hello.attention is not None:
            scheduler = Scheduler(
                self.config.scheduler, Thresholds(math.inf, math.inf), hello.attention, self.config.mode
            )
            # every node's SNIC has the configured rate, so a split read depends on the queues alone
            self.pipeline = Pipeline(scheduler, self.block_size)

    def place(self, machine: StepMachine, connections: Connections) -> None:
        """Move the global queue's head into DE groups' queues, and start what the groups' DEs take."""
        pipeline = self.pipeline
        if pipeline is None or not (machine.queue or any(machine.groups.values())):
            return
        engines = connections.engines
        read_q = _read_queues(engines)
        de: dict[Hashable, list[EngineReport]] = {}
        for e in connections.alive("de"):
            if e.report is not None:
                de.setdefault(e.hello.node, []).append(_report(e, e.report, read_q))
        queues: dict[Hashable, list[Waiting]] = {
            group: [self._waiting(s, engines) for s in waiting] for group, waiting in machine.groups.items()
        }
        pes = [self._pe_report(e, machine, read_q) for e in connections.alive("pe") if e.fetching]
        scheduler = pipeline.scheduler
        scheduler.thresholds = self._thresholds(connections)
        done = pipeline.place(
            [self._request(s) for s in machine.queue] if pes else [],  # no PE fetching: the groups only
            Snapshot(pe=pes, de=de, queues=queues, nodes=read_q),
            changed=list(de),
        )
        for w in done.fetched:
            machine.wait_in_group(machine.queue[0], str(w.pe), str(w.group))
        reads = not scheduler.skips_io  # oracle is told its blocks and reads none
        for d in done.admitted:
            pe, chosen = engines[str(d.pe)], engines[str(d.de)]
            tokens = d.request.tokens
            _charge(pe, tokens, d.pe_tokens if reads else 0, 0)
            _charge(chosen, tokens, d.de_tokens if reads else 0, d.request.de_memory_tokens)
            pe.fetching = False  # the Prefill answers its Fetch
            machine.start(machine.steps[str(d.request.request_id)], chosen.hello.engine_id, d.plan)

    # ---- what the scheduler sees ----------------------------------------------------------------

    def _request(self, step: Step) -> Request:
        r = step.request
        return Request(
            request_id=step.req_id,
            tokens=len(r.token_ids),
            cached_tokens=r.prefix_tokens(self.block_size),
            decode_tokens=r.params.max_tokens,
            read_plan=r.plan,
        )

    def _waiting(self, step: Step, engines: Mapping[str, EngineLink]) -> Waiting:
        assert step.pe is not None and step.group is not None
        return Waiting(self._request(step), step.pe, engines[step.pe].hello.node, step.group)

    def _pe_report(
        self, engine: EngineLink, machine: StepMachine, read_q: Mapping[Hashable, int]
    ) -> EngineReport:
        """The PE's figures with its steps that wait in DE groups' queues: chosen, not yet told."""
        r = engine.report or _no_report(engine)
        mine = [s for q in machine.groups.values() for s in q if s.pe == engine.hello.engine_id]
        r = replace(r, seq=r.seq + len(mine), tokens=r.tokens + sum(len(s.request.token_ids) for s in mine))
        return _report(engine, r, read_q)

    def _snic_tps(self, engines: Mapping[str, EngineLink]) -> float:
        """Tokens/s one storage NIC reads: the configured cap, else the fastest rate measured so far."""
        per_token = next(iter(engines.values())).hello.kv_bytes_per_token
        if self.config.store.snic_read_bps is not None:
            return self.config.store.snic_read_bps / per_token
        measured = [e.report.read_tps for e in engines.values() if e.report and e.report.read_tps > 0]
        return max(measured, default=math.inf)

    def _thresholds(self, connections: Connections) -> Thresholds:
        """alpha and beta from the measured storage rate and the PEs' profiled prefill rates."""
        rates = [e.hello.prefill_tps for e in connections.alive("pe") if e.hello.prefill_tps > 0]
        prefill = sum(rates) / len(rates) if rates else math.inf
        return derive_thresholds(self.config.scheduler, self._snic_tps(connections.engines), prefill)


def _read_queues(engines: Mapping[str, EngineLink]) -> dict[Hashable, int]:
    """Engines of one node share its storage NIC, so its read queue is theirs together."""
    read_q: dict[Hashable, int] = {}
    for e in engines.values():
        if e.alive:
            read_q[e.hello.node] = read_q.get(e.hello.node, 0) + (e.report.read_q if e.report else 0)
    return read_q


def _report(engine: EngineLink, r: Report, read_q: Mapping[Hashable, int]) -> EngineReport:
    h = engine.hello
    return EngineReport(
        engine_id=h.engine_id,
        node_id=h.node,
        role=h.role,
        seq_e=r.seq,
        tok_e=r.tokens,
        read_q=read_q.get(h.node, 0),
        free_tokens=r.free_tokens,
    )


def _no_report(engine: EngineLink) -> Report:
    return Report(engine_id=engine.hello.engine_id, seq=0, tokens=0, read_q=0)


def _charge(engine: EngineLink, tokens: int, reads: int, memory: int) -> None:
    """Count a start in the engine's figures until its next report says it itself."""
    r = engine.report or _no_report(engine)
    engine.report = replace(
        r,
        seq=r.seq + 1,
        tokens=r.tokens + tokens,
        read_q=r.read_q + reads,
        free_tokens=r.free_tokens - memory,
    )
