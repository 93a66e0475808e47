"""The controller: the cluster's side of the control channel, the global request queue, and the
state machine of one step across a PE and a DE.

submit -> (a PE fetches; scheduler/ picks the PE, the DE and the read plan from the engines'
reports) -> Admit to the DE + Prefill to the PE -> Admitted (DE read done) -> DeSlots to the PE ->
Prefilled (first token) -> Decode to the DE -> Tokens ... -> Finished.
A request whose engine dies, or whose transfer fails, before any token reached the caller is
retried on healthy engines; otherwise the caller gets EngineUnavailable. Any other error an engine
reports (bad input, a context too long for its memory, the store) reaches the caller at once, as
its own class: the engine goes on serving every other request.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, Listener

from dualpath_sdk.cluster.metrics import Metrics
from dualpath_sdk.config import ClusterConfig, Mode, ReadPlanChoice
from dualpath_sdk.engine.messages import (
    Admit,
    Admitted,
    Cancel,
    Decode,
    DeSlots,
    Failed,
    Fetch,
    Finished,
    Hello,
    Prefill,
    Prefilled,
    Report,
    Tokens,
)
from dualpath_sdk.engine.sequence import SamplingParams
from dualpath_sdk.errors import (
    RETRYABLE,
    DualPathError,
    EngineUnavailable,
    InvalidInput,
    QueueFull,
    from_wire,
)
from dualpath_sdk.scheduler import (
    NO_READ,
    EngineReport,
    PlanKind,
    ReadPlan,
    Request,
    Scheduler,
    Thresholds,
    derive_thresholds,
    pe_only,
    split_read,
)

MAX_ATTEMPTS = 2


@dataclass
class StepRequest:
    """One step. The cached prefix (store/prefix.py) is `keys`, the stored blocks in chain order:
    Full Blocks, then a partial block when `cached_tokens` is not a multiple of the block size."""

    token_ids: list[int]
    params: SamplingParams
    tenant: str
    keys: list[bytes]
    plan: ReadPlanChoice = "auto"
    cached_tokens: int | None = None  # tokens `keys` hold; None: every key is a Full Block


@dataclass
class StepOutcome:
    """What the caller learns when a step ends (tokens arrive separately, as they come)."""

    finish_reason: str
    plan: PlanKind
    num_cached: int
    bytes_pe: int
    bytes_de: int
    persisted: int
    persist_failed: int
    retries: int
    queue_s: float
    read_s: float
    prefill_s: float
    ttft_s: float
    decode_s: float


Event = list[int] | StepOutcome | DualPathError  # tokens as they come, then how the step ended


@dataclass
class _Engine:
    hello: Hello
    conn: Connection
    report: Report | None = None
    last_seen: float = field(default_factory=time.monotonic)
    fetching: bool = False
    alive: bool = True


@dataclass
class _Step:
    req_id: str
    request: StepRequest
    events: queue.Queue[Event]
    submitted: float = field(default_factory=time.perf_counter)
    attempts: int = 0
    pe: str | None = None
    de: str | None = None
    plan: PlanKind = "none"
    dispatched: float = 0.0
    de_read_s: float = 0.0
    prefilled: Prefilled | None = None
    first_token_at: float = 0.0
    streamed: bool = False
    generated: int = 0  # tokens sent to the caller


class Controller:
    def __init__(self, authkey: bytes, config: ClusterConfig) -> None:
        self.config = config
        self.block_size = config.engine.block_size
        self.mode: Mode = config.mode
        self.scheduler: Scheduler | None = None  # made when the first PE has profiled itself
        self.listener = Listener(("127.0.0.1", 0), authkey=authkey)
        self.address: tuple[str, int] = self.listener.address
        self.lock = threading.RLock()
        self.engines: dict[str, _Engine] = {}
        self.engine_ready = threading.Condition(self.lock)
        self.queue: deque[_Step] = deque()
        self.steps: dict[str, _Step] = {}
        self._ids = itertools.count()
        self._closed = False
        self.metrics = Metrics()
        threading.Thread(target=self._accept, name="controller-accept", daemon=True).start()

    # ---- the caller's side --------------------------------------------------------------------

    def submit(self, request: StepRequest) -> tuple[str, queue.Queue[Event]]:
        """Queue a step. Events: token lists as they come, then a StepOutcome or the error."""
        cached, bs = self._cached_tokens(request), self.block_size
        if -(-cached // bs) != len(request.keys) or cached >= max(len(request.token_ids), 1):
            raise InvalidInput(
                f"a cached prefix of {cached} tokens in {len(request.keys)} blocks of {bs} "
                f"for a prompt of {len(request.token_ids)}"
            )
        with self.lock:
            if self._closed:
                raise EngineUnavailable("the cluster is closed")
            if len(self.steps) >= self.config.max_steps:
                self.metrics.queue_full.inc()
                raise QueueFull(f"the cluster holds {len(self.steps)} steps, its limit: retry later")
            step = _Step(f"r{next(self._ids)}", request, queue.Queue())
            self.steps[step.req_id] = step
            self.queue.append(step)
            self._dispatch()
            return step.req_id, step.events

    def cancel(self, req_id: str) -> None:
        with self.lock:
            step = self.steps.pop(req_id, None)
            if step is not None:
                if step in self.queue:
                    self.queue.remove(step)
                self._cancel_on_engines(step)

    def stop(self, req_id: str) -> None:
        """End a decoding step now, as finished on a stop the caller found (a stop string): the
        engines drop it and the caller's next event is its outcome."""
        with self.lock:
            step = self.steps.pop(req_id, None)
            if step is None or step.prefilled is None:
                return  # it ended meanwhile (its outcome is queued) or cannot have streamed yet
            self._cancel_on_engines(step)
            self._finish(step, Finished(req_id, "stop", 0))

    def wait_for_engines(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.lock:
            while sum(e.alive for e in self.engines.values()) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise EngineUnavailable(
                        f"only {len(self.engines)} of {count} engines started in {timeout} s"
                    )
                self.engine_ready.wait(left)

    def engine_died(self, engine_id: str) -> None:
        """Called by the launcher's health check: retry or fail every step that still needs the
        engine. A step already decoding needs only its DE: its PE's death leaves it streaming."""
        with self.lock:
            engine = self.engines.get(engine_id)
            if engine is None or not engine.alive:
                return
            engine.alive = False
            engine.conn.close()
            for step in list(self.steps.values()):
                if step.de == engine_id or (step.pe == engine_id and step.prefilled is None):
                    self._retry_or_fail(step, f"engine {engine_id} died")

    def last_seen(self) -> dict[str, float]:
        with self.lock:
            return {eid: e.last_seen for eid, e in self.engines.items() if e.alive}

    def close(self) -> None:
        """Fail every unfinished step at once, and say goodbye to the engines."""
        with self.lock:
            self._closed = True
            self.queue.clear()
            for step in list(self.steps.values()):
                self._fail(step, EngineUnavailable("the cluster closed while the step ran"))
            for engine in self.engines.values():
                if engine.alive:
                    with contextlib.suppress(OSError):
                        engine.conn.send(None)
        self.listener.close()

    # ---- connections ---------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: Connection) -> None:
        try:
            hello = conn.recv()
        except (EOFError, OSError):
            return
        assert isinstance(hello, Hello)
        engine_id = hello.engine_id
        with self.lock:
            self.engines[engine_id] = _Engine(hello, conn)
            if self.scheduler is None and hello.attention is not None:
                self.scheduler = Scheduler(
                    self.config.scheduler, Thresholds(math.inf, math.inf), hello.attention, self.mode
                )
            self.engine_ready.notify_all()
            self._dispatch()  # steps may be waiting for this engine (a respawned DE, say)
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return  # the health check decides whether the engine is dead
            with self.lock:
                engine = self.engines.get(engine_id)
                if engine is None or engine.conn is not conn:
                    return
                engine.last_seen = time.monotonic()
                self._on_message(engine, message)

    def _send(self, engine_id: str, message: object) -> None:
        with contextlib.suppress(OSError):  # a dead engine: the health check retries its steps
            self.engines[engine_id].conn.send(message)

    # ---- the state machine (under self.lock) -----------------------------------------------------

    def _on_message(self, engine: _Engine, message: object) -> None:
        if isinstance(message, Report):
            engine.report = message
            h = engine.hello
            self.metrics.engine_report(h.engine_id, h.role, message)
            self._dispatch()  # a step waiting for beta or DE memory may fit now
            return
        if isinstance(message, Fetch):
            engine.report = message.report
            engine.fetching = True
            self._dispatch()
            return
        step = self.steps.get(getattr(message, "req_id", ""))
        if step is None:
            return  # a cancelled or retried step's late message
        if isinstance(message, Admitted):
            if step.pe is not None and step.de is not None:
                step.de_read_s = message.read_s
                buffer = self.engines[step.de].hello.buffer
                assert buffer is not None
                self._send(step.pe, DeSlots(step.req_id, buffer, message.offsets, message.valid_reads))
        elif isinstance(message, Prefilled):
            assert step.de is not None
            step.prefilled = message
            step.first_token_at = time.perf_counter()
            step.streamed = True
            step.generated = 1
            step.events.put([message.first_token])
            request = step.request
            tokens = [*request.token_ids, message.first_token]
            stored = message.num_cached // self.block_size  # a loaded partial block is rewritten whole
            decode = Decode(
                step.req_id, tokens, request.params, request.tenant, stored, self.mode != "oracle"
            )
            self._send(step.de, decode)
        elif isinstance(message, Tokens):
            step.generated += len(message.tokens)
            step.events.put(message.tokens)
        elif isinstance(message, Finished):
            del self.steps[step.req_id]
            self._finish(step, message)
        elif isinstance(message, Failed):
            if message.kind in RETRYABLE:
                self._retry_or_fail(step, message.error)
            else:
                self._cancel_on_engines(step)
                self._fail(step, from_wire(message.kind, message.error))

    def _dispatch(self) -> None:
        """Hand queued steps to fetching PEs in global FIFO order, through the paper's scheduler:
        PE choice, then the DE group and the DE in it, then the read plan. A step the scheduler
        cannot place (every fetching PE over beta, no DE memory) waits for the next report."""
        while self.queue and self.scheduler is not None:
            pes = [e for e in self._alive("pe") if e.fetching]
            des = [e for e in self._alive("de") if e.report is not None]
            if not pes or not des:
                return
            self.scheduler.thresholds = self._thresholds()
            step = self.queue[0]
            request = self._request(step)
            placed = self.scheduler.choose_pe([request], [self._report(e) for e in pes])
            if not placed:
                return
            pe = self.engines[str(placed[0].engine_id)]
            de = self._choose_de(request, des)
            if de is None:
                return
            self.queue.popleft()
            step.pe, step.de, step.dispatched = pe.hello.engine_id, de.hello.engine_id, time.perf_counter()
            plan = self._plan(step, pe, de)
            step.plan = plan.kind
            cached, split = request.cached_tokens, plan.pe_blocks
            pe_tokens = min(split * self.block_size, cached)  # the DE side reads the blocks after split
            self._charge(pe, request.tokens, pe_tokens, 0)
            self._charge(de, request.tokens, cached - pe_tokens, request.de_memory_tokens)
            keys = list(enumerate(step.request.keys))
            pe.fetching = False
            self._send(de.hello.engine_id, Admit(step.req_id, request.tokens, keys[split:], cached))
            self._send(
                pe.hello.engine_id,
                Prefill(
                    step.req_id,
                    step.request.token_ids,
                    de.hello.engine_id,
                    keys[:split],
                    list(range(split, len(keys))),
                    cached,
                    step.request.params,
                    self.mode,
                ),
            )

    def _choose_de(self, request: Request, des: list[_Engine]) -> _Engine | None:
        """The DE group (node) with the fewest tokens, then the DE inside it (memory, Z slack)."""
        assert self.scheduler is not None
        groups: dict[str, list[_Engine]] = {}
        for e in des:
            groups.setdefault(e.hello.node, []).append(e)
        group_tok = {node: sum(self._report(e).tok_e for e in group) for node, group in groups.items()}
        [(_, node)] = self.scheduler.choose_de_group([request], group_tok)
        group = groups[node]
        placed = self.scheduler.choose_de([request], [self._report(e) for e in group])
        if placed:
            return self.engines[str(placed[0].engine_id)]
        if all(self._report(e).seq_e == 0 for e in group):
            return group[0]  # bigger than an idle DE's memory: let the DE refuse it (ContextTooLong)
        return None

    def _plan(self, step: _Step, pe: _Engine, de: _Engine) -> ReadPlan:
        """The read side: forced per step, or the scheduler's (shorter queue, or split by drain rate)."""
        assert self.scheduler is not None
        cached = len(step.request.keys)  # blocks, the last one partial where the tokens end inside it
        forced = step.request.plan
        if self.mode != "dualpath" or forced == "pe":
            return pe_only(cached)  # basic reads on the PE side only; oracle skips the reads it is given
        if forced == "de":
            return ReadPlan("de", 0, cached) if cached else NO_READ
        # every node's SNIC has the configured rate, so the split depends on the queues alone
        args = (cached, self.block_size, self._node_read_q(pe), self._node_read_q(de), 1.0, 1.0)
        tokens = self._cached_tokens(step.request)
        if forced == "auto":
            return self.scheduler.plan_read(*args, cached_tokens=tokens)
        plan = split_read(*args, cached_tokens=tokens)
        if plan.kind != "split" and cached >= 2:  # forced: both sides read, whatever the queues say
            plan = ReadPlan("split", cached // 2, cached - cached // 2)
        return plan

    # ---- what the scheduler sees ----------------------------------------------------------------

    def _alive(self, role: str) -> list[_Engine]:
        return [e for e in self.engines.values() if e.alive and e.hello.role == role]

    def _request(self, step: _Step) -> Request:
        r = step.request
        return Request(step.req_id, len(r.token_ids), self._cached_tokens(r), r.params.max_tokens)

    def _cached_tokens(self, request: StepRequest) -> int:
        if request.cached_tokens is None:
            return len(request.keys) * self.block_size
        return request.cached_tokens

    def _report(self, engine: _Engine) -> EngineReport:
        r = engine.report or Report(engine.hello.engine_id, 0, 0, 0)
        h = engine.hello
        read_q = self._node_read_q(engine)
        return EngineReport(h.engine_id, h.node, h.role, r.seq, r.tokens, read_q, r.free_tokens)

    def _node_read_q(self, engine: _Engine) -> int:
        """Engines of one node share its storage NIC, so its read queue is theirs together."""
        node = engine.hello.node
        same = [e for e in self.engines.values() if e.alive and e.hello.node == node]
        return sum(e.report.read_q for e in same if e.report is not None)

    def _charge(self, engine: _Engine, tokens: int, reads: int, memory: int) -> None:
        """Count a placement in the engine's figures until its next report says it itself."""
        r = engine.report or Report(engine.hello.engine_id, 0, 0, 0)
        engine.report = replace(
            r,
            seq=r.seq + 1,
            tokens=r.tokens + tokens,
            read_q=r.read_q + reads,
            free_tokens=r.free_tokens - memory,
        )

    def _snic_tps(self) -> float:
        """Tokens/s one storage NIC reads: the configured cap, else the fastest rate measured so far."""
        per_token = next(iter(self.engines.values())).hello.kv_bytes_per_token
        if self.config.store.snic_read_bps is not None:
            return self.config.store.snic_read_bps / per_token
        measured = [e.report.read_tps for e in self.engines.values() if e.report and e.report.read_tps > 0]
        return max(measured, default=math.inf)

    def _thresholds(self) -> Thresholds:
        """alpha and beta from the measured storage rate and the PEs' profiled prefill rates."""
        rates = [e.hello.prefill_tps for e in self._alive("pe") if e.hello.prefill_tps > 0]
        prefill = sum(rates) / len(rates) if rates else math.inf
        return derive_thresholds(self.config.scheduler, self._snic_tps(), prefill)

    def _retry_or_fail(self, step: _Step, why: str) -> None:
        self._cancel_on_engines(step)
        step.attempts += 1
        if not step.streamed and step.attempts < MAX_ATTEMPTS and not self._closed:
            step.pe = step.de = step.prefilled = None
            self.metrics.retries.inc()
            self.queue.appendleft(step)
            self._dispatch()
            return
        self._fail(step, EngineUnavailable(f"step failed: {why}"))

    def _finish(self, step: _Step, finished: Finished) -> None:
        outcome = self._outcome(step, finished)
        self.metrics.persisted.inc(finished.persisted)
        self.metrics.persist_failed.inc(finished.persist_failed)
        o = outcome
        self.metrics.step_finished(
            len(step.request.token_ids),
            o.num_cached,
            step.generated,
            o.bytes_pe,
            o.bytes_de,
            o.queue_s,
            o.ttft_s,
            o.decode_s,
        )
        step.events.put(outcome)

    def _fail(self, step: _Step, error: DualPathError) -> None:
        self.steps.pop(step.req_id, None)
        self.metrics.steps.labels(type(error).__name__).inc()
        step.events.put(error)

    def _cancel_on_engines(self, step: _Step) -> None:
        for engine_id in (step.pe, step.de):
            if engine_id is not None and self.engines[engine_id].alive:
                self._send(engine_id, Cancel(step.req_id))

    def _outcome(self, step: _Step, finished: Finished) -> StepOutcome:
        p = step.prefilled
        assert p is not None
        now = time.perf_counter()
        return StepOutcome(
            finish_reason=finished.reason,
            plan=step.plan,
            num_cached=p.num_cached,
            bytes_pe=p.bytes_pe,
            bytes_de=p.bytes_de,
            persisted=finished.persisted,
            persist_failed=finished.persist_failed,
            retries=step.attempts,
            queue_s=step.dispatched - step.submitted,
            read_s=max(p.read_s, step.de_read_s),
            prefill_s=p.prefill_s,
            ttft_s=step.first_token_at - step.submitted,
            decode_s=now - step.first_token_at,
        )
