"""The controller against scripted engines: real control-channel connections whose engine ends the
test plays (no engine processes), so that a step's order of events, its retries, and the late
messages its state machine drops are checked message by message."""

from __future__ import annotations

import os
import queue
import threading
import time
from multiprocessing import Pipe
from multiprocessing.connection import Client
from typing import Any

import pytest

from dualpath_sdk.cluster.connections import EngineLink
from dualpath_sdk.cluster.controller import Controller, Event, StepOutcome, StepRequest
from dualpath_sdk.cluster.steps import StepState
from dualpath_sdk.config import ClusterConfig
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
from dualpath_sdk.errors import EngineUnavailable
from dualpath_sdk.scheduler import AttentionModel, Role
from dualpath_sdk.transfer import RegionDescriptor

AUTHKEY = b"test-controller"
WAIT_S = 30.0
BUFFER = RegionDescriptor("local", "de0-buffer", 1 << 20, "/dev/shm/x", 0, os.getpid(), 0)
PROMPT = list(range(100))  # one cached Full Block of 64 tokens, 36 new


class ScriptedEngine:
    """The engine end of one control connection, played by the test."""

    def __init__(self, controller: Controller, engine_id: str, role: Role, prefill_tps: float = 0.0) -> None:
        self.engine_id = engine_id
        self.conn = Client(controller.address, authkey=AUTHKEY)
        self.conn.send(
            Hello(
                engine_id=engine_id,
                role=role,
                node=f"node-{engine_id}",
                pid=os.getpid(),
                fingerprint="f",
                kv_dtype="float32",
                kv_bytes_per_token=1024,
                buffer=BUFFER if role == "de" else None,
                attention=AttentionModel(1e-6, 0.0, 0.0) if role == "pe" else None,
                prefill_tps=prefill_tps,  # 0: no profile, no beta
            )
        )
        self.reported = 0

    def send(self, message: object) -> None:
        self.conn.send(message)

    def recv(self) -> Any:
        assert self.conn.poll(WAIT_S), f"{self.engine_id} got nothing"
        return self.conn.recv()

    def report(self, controller: Controller, free_tokens: int = 10**6, seq: int = 0, tokens: int = 0) -> None:
        """Send a Report and wait until the controller has handled it: every message this engine
        sent before it has been handled too (one thread reads one connection, in order). Its tokens
        are `tokens` plus the reports so far, so that each report says a figure of its own."""
        self.reported += 1
        sent = tokens + self.reported
        self.send(Report(engine_id=self.engine_id, seq=seq, tokens=sent, read_q=0, free_tokens=free_tokens))
        registry = controller.metrics.registry
        deadline = time.monotonic() + WAIT_S
        while registry.get_sample_value("dualpath_engine_tokens", {"engine": self.engine_id}) != sent:
            assert time.monotonic() < deadline, f"the controller did not handle {self.engine_id}'s report"
            time.sleep(0.01)

    def fetch(self) -> None:
        self.send(Fetch(report=Report(engine_id=self.engine_id, seq=0, tokens=0, read_q=0)))


@pytest.fixture
def cluster() -> Any:
    controller = Controller(AUTHKEY, ClusterConfig())
    pe, de = ScriptedEngine(controller, "pe0", "pe"), ScriptedEngine(controller, "de0", "de")
    controller.wait_for_engines(2, WAIT_S)
    de.report(controller)
    yield controller, pe, de
    controller.close()


def _state(controller: Controller, req_id: str) -> StepState:
    with controller.lock:
        return controller.steps[req_id].state


def _submit(controller: Controller, pe: ScriptedEngine, de: ScriptedEngine) -> tuple[str, queue.Queue[Event]]:
    """A step placed on pe0 and de0, its one cached block read on the DE side."""
    req_id, events = controller.submit(
        StepRequest(PROMPT, SamplingParams(max_tokens=4), "t", [b"k0"], plan="de")
    )
    pe.fetch()
    admit, prefill = de.recv(), pe.recv()
    assert admit == Admit(req_id=req_id, prompt_len=100, reads=[(0, b"k0")], cached_tokens=64)
    assert isinstance(prefill, Prefill)
    assert (prefill.req_id, prefill.de_engine, prefill.pe_reads, prefill.de_reads) == (req_id, "de0", [], [0])
    assert _state(controller, req_id) is StepState.PLACED
    return req_id, events


def _prefilled(req_id: str, first: int = 7) -> Prefilled:
    return Prefilled(
        req_id=req_id, first_token=first, num_cached=64, read_s=0.0, prefill_s=0.02, bytes_pe=0, bytes_de=123
    )


def _get(events: queue.Queue[Event]) -> Event:
    return events.get(timeout=WAIT_S)


def test_a_step_goes_through_its_states_in_order_and_late_messages_change_nothing(cluster: Any) -> None:
    controller, pe, de = cluster
    req_id, events = _submit(controller, pe, de)

    pe.send(_prefilled(req_id))  # before its DE read: another attempt's, dropped
    pe.report(controller)
    assert events.empty() and _state(controller, req_id) is StepState.PLACED

    de.send(Admitted(req_id=req_id, offsets=[3, 4], valid_reads=1, read_s=0.01))
    assert pe.recv() == DeSlots(req_id=req_id, buffer=BUFFER, offsets=[3, 4], valid_reads=1)
    assert _state(controller, req_id) is StepState.DE_READY

    pe.send(_prefilled(req_id))
    assert _get(events) == [7]
    decode = de.recv()
    assert isinstance(decode, Decode)
    assert (decode.token_ids, decode.tenant, decode.stored_blocks, decode.persist) == (
        [*PROMPT, 7],
        "t",
        1,
        True,
    )
    assert _state(controller, req_id) is StepState.PREFILLED

    pe.send(_prefilled(req_id, first=99))  # a second first token: dropped
    pe.report(controller)
    de.send(Tokens(req_id=req_id, tokens=[8, 9]))
    assert _get(events) == [8, 9]
    assert _state(controller, req_id) is StepState.DECODING

    de.send(Finished(req_id=req_id, reason="length", persisted=1))
    outcome = _get(events)
    assert isinstance(outcome, StepOutcome)
    assert (outcome.finish_reason, outcome.plan, outcome.num_cached, outcome.bytes_de) == (
        "length",
        "de",
        64,
        123,
    )
    assert (outcome.retries, outcome.read_s, outcome.persisted) == (0, 0.01, 1)
    assert req_id not in controller.steps
    assert controller.metrics.registry.get_sample_value("dualpath_steps_total", {"outcome": "ok"}) == 1


def test_a_failed_transfer_is_retried_once_then_fails_and_a_queued_step_ignores_late_failures(
    cluster: Any,
) -> None:
    controller, pe, de = cluster
    req_id, events = _submit(controller, pe, de)
    failed = Failed(req_id=req_id, kind="TransferError", error="the DE buffer vanished")

    pe.send(failed)
    assert pe.recv() == Cancel(req_id=req_id) and de.recv() == Cancel(req_id=req_id)
    pe.report(controller)  # the PE has not fetched again: the step waits in the queue
    assert _state(controller, req_id) is StepState.QUEUED
    pe.send(failed)  # the first attempt's late word
    pe.report(controller)
    with controller.lock:
        step = controller.steps[req_id]
        assert (step.state, step.attempts, list(controller.machine.queue)) == (StepState.QUEUED, 1, [step])
    assert events.empty()

    pe.fetch()
    assert isinstance(de.recv(), Admit) and isinstance(pe.recv(), Prefill)
    pe.send(failed)
    error = _get(events)
    assert isinstance(error, EngineUnavailable) and "vanished" in str(error)
    assert req_id not in controller.steps
    assert controller.metrics.registry.get_sample_value("dualpath_step_retries_total") == 1


def test_a_streaming_step_outlives_its_pe_and_a_placed_one_is_retried_when_its_de_dies(cluster: Any) -> None:
    controller, pe, de = cluster
    req_id, events = _submit(controller, pe, de)
    de.send(Admitted(req_id=req_id, offsets=[0, 1], valid_reads=1, read_s=0.0))
    pe.recv()
    pe.send(_prefilled(req_id))
    assert _get(events) == [7]
    de.recv()
    controller.engine_died("pe0")
    assert _state(controller, req_id) is StepState.PREFILLED
    controller.stop(req_id)  # the caller found a stop string
    assert de.recv() == Cancel(req_id=req_id)
    outcome = _get(events)
    assert isinstance(outcome, StepOutcome) and outcome.finish_reason == "stop"

    pe2 = ScriptedEngine(controller, "pe0", "pe")  # pe0's respawn
    controller.wait_for_engines(2, WAIT_S)
    other, events = _submit(controller, pe2, de)
    controller.stop(other)  # nothing streamed yet: no stop
    assert _state(controller, other) is StepState.PLACED
    controller.engine_died("de0")
    assert pe2.recv() == Cancel(req_id=other)
    assert _state(controller, other) is StepState.QUEUED  # no DE left to place it on

    controller.close()
    assert isinstance(_get(events), EngineUnavailable)
    assert pe2.recv() is None  # the goodbye


BIG = list(range(200))  # 200 + 4 tokens of DE memory: more than a DE with 120 free has


def _submit_queued(controller: Controller, prompt: list[int]) -> tuple[str, queue.Queue[Event]]:
    return controller.submit(StepRequest(prompt, SamplingParams(max_tokens=4), "t", [b"k0"]))


def _silent(engine: ScriptedEngine) -> bool:
    return not engine.conn.poll(0.2)


def test_a_step_no_de_has_memory_for_waits_in_its_group_and_one_behind_it_goes_to_another(
    cluster: Any,
) -> None:
    controller, pe, de0 = cluster
    de1 = ScriptedEngine(controller, "de1", "de")
    controller.wait_for_engines(3, WAIT_S)
    de0.report(controller, free_tokens=120, seq=1)  # busy: the fewest tokens, no memory for BIG
    de1.report(controller, tokens=150)
    big, big_events = _submit_queued(controller, BIG)
    small, _ = _submit_queued(controller, PROMPT)
    pe.fetch()  # one pass: both get pe0; BIG joins de0's group (2 tokens), then PROMPT de1's (151 < 202)
    admit, prefill = de1.recv(), pe.recv()
    assert isinstance(admit, Admit) and isinstance(prefill, Prefill)
    assert (admit.req_id, prefill.req_id, prefill.de_engine) == (small, small, "de1")
    assert _state(controller, small) is StepState.PLACED
    with controller.lock:
        step = controller.steps[big]
        assert (step.state, step.pe, step.group, list(controller.machine.queue)) == (
            StepState.WAITING_DE,
            "pe0",
            "node-de0",
            [],
        )
    assert _silent(de0) and big_events.empty()

    de0.report(controller, free_tokens=10**6, seq=1)  # memory freed: its group's head goes, on its PE
    admit, prefill = de0.recv(), pe.recv()
    assert (admit.req_id, prefill.req_id, prefill.de_engine) == (big, big, "de0")
    assert _state(controller, big) is StepState.PLACED


def test_a_cancelled_waiting_step_leaves_its_group_and_close_fails_the_waiting_ones(cluster: Any) -> None:
    controller, pe, de = cluster
    de.report(controller, free_tokens=120, seq=1)
    big, big_events = _submit_queued(controller, BIG)
    small, _ = _submit_queued(controller, PROMPT)
    pe.fetch()
    pe.report(controller)  # its Fetch handled
    assert _silent(de)  # BIG heads the group's queue, PROMPT waits behind it
    assert (_state(controller, big), _state(controller, small)) == (StepState.WAITING_DE,) * 2

    controller.cancel(big)  # no engine was told of it: no Cancel, and PROMPT heads the queue now
    admit, prefill = de.recv(), pe.recv()
    assert (admit.req_id, prefill.req_id) == (small, small)
    assert big not in controller.steps and big_events.empty()

    late, late_events = _submit_queued(controller, PROMPT)
    pe.fetch()
    pe.report(controller)
    assert _silent(de) and _state(controller, late) is StepState.WAITING_DE  # 16 tokens free now
    controller.close()
    assert isinstance(_get(late_events), EngineUnavailable)
    assert controller.machine.groups == {}


def test_a_waiting_step_goes_back_to_the_global_queue_when_its_pe_or_its_groups_last_de_dies(
    cluster: Any,
) -> None:
    controller, pe, de = cluster
    de.report(controller, free_tokens=120, seq=1)
    big, events = _submit_queued(controller, BIG)
    pe.fetch()
    pe.report(controller)
    assert _state(controller, big) is StepState.WAITING_DE

    controller.engine_died("pe0")
    with controller.lock:
        step = controller.steps[big]
        assert (step.state, step.pe, step.attempts, list(controller.machine.queue)) == (
            StepState.QUEUED,
            None,
            0,
            [step],
        )
    assert _silent(de)  # the DE never heard of it

    pe2 = ScriptedEngine(controller, "pe0", "pe")  # pe0's respawn
    controller.wait_for_engines(2, WAIT_S)
    pe2.fetch()
    pe2.report(controller, tokens=100)  # a figure pe0's first process never sent
    assert _state(controller, big) is StepState.WAITING_DE
    controller.engine_died("de0")  # its group has no DE left
    assert _state(controller, big) is StepState.QUEUED
    assert _silent(pe2) and not any(controller.machine.groups.values())

    de2 = ScriptedEngine(controller, "de0", "de")  # de0's respawn, its memory free
    controller.wait_for_engines(2, WAIT_S)
    de2.report(controller)
    admit, prefill = de2.recv(), pe2.recv()  # pe0 is still fetching: it was given no Prefill
    assert (admit.req_id, prefill.req_id, prefill.de_engine) == (big, big, "de0")
    assert events.empty() and _state(controller, big) is StepState.PLACED


def test_a_pe_counts_its_steps_waiting_in_groups_against_beta() -> None:
    config = ClusterConfig()
    controller = Controller(AUTHKEY, config)
    try:
        pe = ScriptedEngine(controller, "pe0", "pe", prefill_tps=150 / config.scheduler.beta_s)  # beta 150
        de = ScriptedEngine(controller, "de0", "de")
        controller.wait_for_engines(2, WAIT_S)
        de.report(controller, free_tokens=120, seq=1)
        big, _ = _submit_queued(controller, BIG)
        pe.fetch()
        pe.report(controller)
        assert _state(controller, big) is StepState.WAITING_DE
        small, _ = _submit_queued(controller, PROMPT)  # pe0 holds BIG's 200 tokens: over beta
        assert _state(controller, small) is StepState.QUEUED

        de.report(controller, seq=1)  # BIG starts; pe0 has its Prefill and is not fetching
        assert de.recv().req_id == big and pe.recv().req_id == big
        pe.report(controller)
        assert _state(controller, small) is StepState.QUEUED
        pe.fetch()  # its figures say 0 tokens: under beta again
        assert de.recv().req_id == small and pe.recv().req_id == small
    finally:
        controller.close()


def test_a_send_never_waits_for_the_engine_to_read() -> None:
    ours, theirs = Pipe()
    link = EngineLink(
        Hello(
            engine_id="de9",
            role="de",
            node="n",
            pid=os.getpid(),
            fingerprint="f",
            kv_dtype="float32",
            kv_bytes_per_token=1,
        ),
        ours,
    )
    big = list(range(1 << 20))  # far more than a socket buffer holds

    def send_all() -> None:
        for _ in range(4):
            link.send(big)

    sender = threading.Thread(target=send_all)
    sender.start()
    sender.join(WAIT_S)
    assert not sender.is_alive()  # nobody has read a byte yet
    assert all(theirs.recv() == big for _ in range(4))
    link.close()
    assert theirs.poll(WAIT_S)
    with pytest.raises(EOFError):  # the dead engine's connection is closed after what was queued
        theirs.recv()
