"""The state machine of one step across a PE and a DE, its retries and its outcome.

    QUEUED --its PE chosen, its DE group (node) too--> WAITING_DE (in the group's queue)
    WAITING_DE --a DE of the group has memory for it: Admit to the DE, Prefill to the PE--> PLACED
    PLACED --Admitted (the DE read its blocks): DeSlots to the PE--> DE_READY
    DE_READY --Prefilled (the first token): Decode to the DE--> PREFILLED
    PREFILLED, DECODING --Tokens--> DECODING
    PREFILLED, DECODING --Finished--> DONE (the outcome)

A waiting step's engines have not been told of it: its PE's death, or its group's last DE's, puts it
back at the head of the global queue (QUEUED), no attempt lost.
A step whose engine dies, or whose transfer fails, before any token reached the caller is queued
again (QUEUED, at the head) for healthy engines, up to MAX_ATTEMPTS; otherwise the caller gets
EngineUnavailable. Any other error an engine reports (bad input, a context too long for its memory,
the store) reaches the caller at once, as its own class: the engine goes on serving every other
request. Messages find their step by req_id, which a retry keeps: one in a state its handler does
not expect is a retried step's late message, and is dropped, as is any message of a step that ended.
"""

from __future__ import annotations

import enum
import itertools
import queue
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dualpath_sdk.cluster.connections import Connections
from dualpath_sdk.cluster.metrics import Metrics
from dualpath_sdk.config import ClusterConfig, ReadPlanChoice
from dualpath_sdk.engine.messages import (
    Admit,
    Admitted,
    Cancel,
    Decode,
    DeSlots,
    Failed,
    Finished,
    Prefill,
    Prefilled,
    Tokens,
)
from dualpath_sdk.engine.sequence import SamplingParams
from dualpath_sdk.errors import RETRYABLE, DualPathError, EngineUnavailable, from_wire
from dualpath_sdk.scheduler import PlanKind, ReadPlan

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

    def prefix_tokens(self, block_size: int) -> int:
        """Tokens the cached prefix holds."""
        if self.cached_tokens is None:
            return len(self.keys) * block_size
        return self.cached_tokens


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


class StepState(enum.Enum):
    QUEUED = "queued"  # in the global queue: no engine holds it
    WAITING_DE = "waiting-de"  # its PE chosen, in its DE group's queue until a DE there has memory
    PLACED = "placed"  # its DE reads its DE-side blocks, its PE its PE-side ones
    DE_READY = "de-ready"  # the DE's blocks are in its buffer and the PE knows where
    PREFILLED = "prefilled"  # the first token reached the caller; the DE was told to decode
    DECODING = "decoding"  # the DE streams tokens
    DONE = "done"  # finished, failed, stopped or cancelled: out of the table


_ON_BOTH = (StepState.PLACED, StepState.DE_READY)  # its PE and its DE hold it; nothing streamed
_STREAMING = (StepState.PREFILLED, StepState.DECODING)  # only its DE holds it


@dataclass(eq=False)
class Step:
    req_id: str
    request: StepRequest
    events: queue.Queue[Event]
    state: StepState = StepState.QUEUED
    submitted: float = field(default_factory=time.perf_counter)
    attempts: int = 0
    pe: str | None = None  # where it is placed; None while QUEUED
    de: str | None = None
    group: str | None = None  # its DE group (a node) while WAITING_DE
    plan: PlanKind = "none"
    dispatched: float = 0.0
    de_read_s: float = 0.0
    prefilled: Prefilled | None = None
    first_token_at: float = 0.0
    generated: int = 0  # tokens sent to the caller

    def needs(self, engine_id: str) -> bool:
        """Whether the step is lost with that engine: a decoding step needs only its DE, so its
        PE's death leaves it streaming."""
        if self.state in _ON_BOTH:
            return engine_id in (self.pe, self.de)
        return self.state in _STREAMING and engine_id == self.de


class StepMachine:
    """Every unfinished step, the global queue and the DE groups' queues they wait in, moved on by the
    engines' messages. It runs under the controller's lock; `dispatch` places waiting steps (the
    controller's)."""

    def __init__(
        self, config: ClusterConfig, connections: Connections, metrics: Metrics, dispatch: Callable[[], None]
    ) -> None:
        self.block_size = config.engine.block_size
        self.mode = config.mode
        self.connections = connections
        self.metrics = metrics
        self._dispatch = dispatch
        self.steps: dict[str, Step] = {}
        self.queue: deque[Step] = deque()
        self.groups: dict[str, deque[Step]] = {}  # DE group (node) -> its queue, oldest first
        self.closed = False
        self._ids = itertools.count()
        # each message type: the states it is expected in, and its handler
        self._handlers: dict[type, tuple[tuple[StepState, ...], Callable[[Step, Any], None]]] = {
            Admitted: (_ON_BOTH, self._admitted),
            Prefilled: ((StepState.DE_READY,), self._prefilled),
            Tokens: (_STREAMING, self._tokens),
            Finished: (_STREAMING, self._finish),
            Failed: ((*_ON_BOTH, *_STREAMING), self._failed),
        }

    # ---- the controller's calls ---------------------------------------------------------------

    def add(self, request: StepRequest) -> Step:
        step = Step(f"r{next(self._ids)}", request, queue.Queue())
        self.steps[step.req_id] = step
        self.queue.append(step)
        return step

    def wait_in_group(self, step: Step, pe: str, group: str) -> None:
        """Placement chose the global queue's head's PE and DE group: it waits in the group's queue."""
        assert step.state is StepState.QUEUED and self.queue[0] is step
        self.queue.popleft()
        step.state, step.pe, step.group = StepState.WAITING_DE, pe, group
        self.groups.setdefault(group, deque()).append(step)

    def start(self, step: Step, de: str, plan: ReadPlan) -> None:
        """Placement chose a DE of the group for the head of its queue, and the read plan."""
        assert step.state is StepState.WAITING_DE and step.group is not None and step.pe is not None
        waiting = self.groups[step.group]
        assert waiting[0] is step
        waiting.popleft()
        pe = step.pe
        step.state, step.de, step.group, step.dispatched = StepState.PLACED, de, None, time.perf_counter()
        step.plan = plan.kind
        request = step.request
        cached, split = request.prefix_tokens(self.block_size), plan.pe_blocks
        keys = list(enumerate(request.keys))
        admit = Admit(
            req_id=step.req_id, prompt_len=len(request.token_ids), reads=keys[split:], cached_tokens=cached
        )
        self.connections.send(de, admit)
        prefill = Prefill(
            req_id=step.req_id,
            token_ids=request.token_ids,
            de_engine=de,
            pe_reads=keys[:split],
            de_reads=list(range(split, len(keys))),
            cached_tokens=cached,
            params=request.params,
            mode=self.mode,
        )
        self.connections.send(pe, prefill)

    def on_message(self, message: object) -> None:
        handler = self._handlers.get(type(message))
        step = self.steps.get(getattr(message, "req_id", ""))
        if handler is None or step is None:
            return  # a cancelled or ended step's late message
        expected, handle = handler
        if step.state in expected:
            handle(step, message)

    def cancel(self, req_id: str) -> None:
        step = self.steps.get(req_id)
        if step is None:
            return
        if step.state is StepState.QUEUED:
            self.queue.remove(step)
        waiting = step.group
        if waiting is not None:
            self.groups[waiting].remove(step)
        self._end(step)
        if waiting is not None:
            self._dispatch()  # no engine was told of it; the steps behind it in its group may fit now
        else:
            self._cancel_on_engines(step)

    def stop(self, req_id: str) -> None:
        """End a streaming step as finished on a stop the caller found: the engines drop it."""
        step = self.steps.get(req_id)
        if step is None or step.state not in _STREAMING:
            return  # it ended meanwhile (its outcome is queued) or cannot have streamed yet
        self._cancel_on_engines(step)
        self._finish(step, Finished(req_id=req_id, reason="stop", persisted=0))

    def engine_died(self, engine_id: str) -> None:
        """Its waiting steps go back first, so that no pass starts one on the dead engine."""
        nodes = {e.hello.node for e in self.connections.alive("de")}  # a group with no DE left: all back
        back = [s for g, q in self.groups.items() for s in q if s.pe == engine_id or g not in nodes]
        for step in back:
            assert step.group is not None
            self.groups[step.group].remove(step)
            step.state, step.pe, step.group = StepState.QUEUED, None, None
        self.queue.extendleft(sorted(back, key=lambda s: s.submitted, reverse=True))
        for step in list(self.steps.values()):
            if step.needs(engine_id):
                self._retry_or_fail(step, f"engine {engine_id} died")
        if back:
            self._dispatch()

    def close(self) -> None:
        """Fail every unfinished step at once: no retries from now on."""
        self.closed = True
        self.queue.clear()
        self.groups.clear()
        for step in list(self.steps.values()):
            self._fail(step, EngineUnavailable("the cluster closed while the step ran"))

    # ---- one handler per message type ---------------------------------------------------------

    def _admitted(self, step: Step, message: Admitted) -> None:
        """The DE read its blocks: the PE learns where they are in the DE buffer. Again in DE_READY:
        a retried step placed on the same DE again may hear its first attempt's Admitted first, so
        the later one's slots reach the PE too."""
        assert step.pe is not None and step.de is not None
        step.state = StepState.DE_READY
        step.de_read_s = message.read_s
        buffer = self.connections.engines[step.de].hello.buffer
        assert buffer is not None
        slots = DeSlots(
            req_id=step.req_id, buffer=buffer, offsets=message.offsets, valid_reads=message.valid_reads
        )
        self.connections.send(step.pe, slots)

    def _prefilled(self, step: Step, message: Prefilled) -> None:
        assert step.de is not None
        step.state = StepState.PREFILLED
        step.prefilled = message
        step.first_token_at = time.perf_counter()
        step.generated = 1
        step.events.put([message.first_token])
        request = step.request
        decode = Decode(
            req_id=step.req_id,
            token_ids=[*request.token_ids, message.first_token],
            params=request.params,
            tenant=request.tenant,
            stored_blocks=message.num_cached // self.block_size,  # a loaded partial block is rewritten whole
            persist=self.mode != "oracle",
        )
        self.connections.send(step.de, decode)

    def _tokens(self, step: Step, message: Tokens) -> None:
        step.state = StepState.DECODING
        step.generated += len(message.tokens)
        step.events.put(message.tokens)

    def _failed(self, step: Step, message: Failed) -> None:
        if message.kind in RETRYABLE:
            self._retry_or_fail(step, message.error)
        else:
            self._cancel_on_engines(step)
            self._fail(step, from_wire(message.kind, message.error))

    # ---- retries and outcomes -------------------------------------------------------------------

    def _retry_or_fail(self, step: Step, why: str) -> None:
        self._cancel_on_engines(step)
        step.attempts += 1
        if step.state in _ON_BOTH and step.attempts < MAX_ATTEMPTS and not self.closed:
            step.state, step.pe, step.de = StepState.QUEUED, None, None
            self.metrics.retries.inc()
            self.queue.appendleft(step)
            self._dispatch()
            return
        self._fail(step, EngineUnavailable(f"step failed: {why}"))

    def _end(self, step: Step) -> None:
        self.steps.pop(step.req_id, None)
        step.state = StepState.DONE

    def _finish(self, step: Step, finished: Finished) -> None:
        outcome = self._outcome(step, finished)
        self._end(step)
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

    def _fail(self, step: Step, error: DualPathError) -> None:
        self._end(step)
        self.metrics.steps.labels(type(error).__name__).inc()
        step.events.put(error)

    def _cancel_on_engines(self, step: Step) -> None:
        for engine_id in (step.pe, step.de):
            if engine_id is not None and self.connections.engines[engine_id].alive:
                self.connections.send(engine_id, Cancel(req_id=step.req_id))

    def _outcome(self, step: Step, finished: Finished) -> StepOutcome:
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
