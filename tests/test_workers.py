"""The engine workers' protocol, in process: admission waiting for buffer slots, reads, dispatch, order."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dualpath_sdk.config import EngineConfig, StoreConfig, TransferConfig
from dualpath_sdk.engine.decode_worker import DecodeWorker
from dualpath_sdk.engine.messages import Admit, Admitted, Cancel, Decode, Failed, Finished, Prefill, Tokens
from dualpath_sdk.engine.sequence import SamplingParams
from dualpath_sdk.kv.block import FullBlock
from dualpath_sdk.kv.keys import block_keys
from dualpath_sdk.store import open_store
from dualpath_sdk.transfer import open_transport
from tests.conftest import Pair

BS = 16


class _Sent:
    """What the worker hands the process's thread-safe send, in order."""

    def __init__(self) -> None:
        self.messages: list[object] = []
        self.cond = threading.Condition()

    def __call__(self, message: object) -> None:
        with self.cond:
            self.messages.append(message)
            self.cond.notify_all()

    def wait_for(self, kind: type, timeout: float = 30.0) -> object:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not any(isinstance(m, kind) for m in self.messages):
                assert self.cond.wait(deadline - time.monotonic()), f"no {kind.__name__} sent"
            return next(m for m in self.messages if isinstance(m, kind))


@pytest.fixture
def de(tiny_llama: Pair, tmp_path: Path) -> Iterator[tuple[DecodeWorker, _Sent]]:
    store = open_store(StoreConfig(root=tmp_path / "store"), node="test-workers")
    transport = open_transport(TransferConfig(), node="test-workers")
    sent = _Sent()
    config = EngineConfig(block_size=BS, num_blocks=64)
    worker = DecodeWorker("de-test", tiny_llama.ours, config, store, transport, 3, sent)
    yield worker, sent
    worker.close()
    transport.close()
    store.close()


def test_a_prompt_waits_for_buffer_slots_and_cancel_takes_it_out_of_the_queue(
    de: tuple[DecodeWorker, _Sent],
) -> None:
    worker, sent = de
    worker.handle(Admit(req_id="a", prompt_len=3 * BS, reads=[], cached_tokens=0))
    assert isinstance(admitted := sent.wait_for(Admitted), Admitted) and admitted.req_id == "a"
    worker.handle(Admit(req_id="b", prompt_len=BS, reads=[], cached_tokens=0))  # every slot is a's
    report = worker.report()
    assert (report.seq, report.buffer_free) == (2, 0)
    assert [m.req_id for m in sent.messages if isinstance(m, Admitted)] == ["a"]
    worker.handle(Cancel(req_id="b"))
    assert worker.report().seq == 1 and not worker.waiting


def test_reads_count_in_the_read_queue_and_end_at_the_first_missing_block(
    de: tuple[DecodeWorker, _Sent],
) -> None:
    worker, sent = de
    keys = block_keys(worker.core.root_key(), list(range(3 * BS)), BS)
    block = FullBlock.empty(worker.layout)
    worker.store.put(keys[0], None, BS, block)
    worker.store.put(keys[2], keys[1], BS, block)  # block 1 missing: block 2 is of no use
    worker.handle(Admit(req_id="a", prompt_len=3 * BS, reads=list(enumerate(keys)), cached_tokens=3 * BS))
    admitted = sent.wait_for(Admitted)
    assert isinstance(admitted, Admitted) and admitted.valid_reads == 1
    assert worker.report().read_q == 0


def test_a_read_the_store_fails_answers_failed_with_its_kind(de: tuple[DecodeWorker, _Sent]) -> None:
    """Not a miss (that is a recompute): the store raised, so the step fails at once, never hangs."""
    worker, sent = de
    keys = block_keys(worker.core.root_key(), list(range(BS)), BS)
    half = replace(worker.layout, dtype=torch.float16)  # a block of another layout under this key
    worker.store.put(keys[0], None, BS, FullBlock.empty(half))
    worker.handle(Admit(req_id="a", prompt_len=BS + 1, reads=[(0, keys[0])], cached_tokens=BS))
    failed = sent.wait_for(Failed)
    assert isinstance(failed, Failed) and (failed.req_id, failed.kind) == ("a", "InvalidInput")
    assert not any(isinstance(m, Admitted) for m in sent.messages)
    assert worker.report().read_q == 0


def test_a_message_of_the_other_role_is_a_type_error(de: tuple[DecodeWorker, _Sent]) -> None:
    worker, _ = de
    params = SamplingParams()
    with pytest.raises(TypeError, match="unexpected Prefill"):
        worker.handle(
            Prefill(
                req_id="x",
                token_ids=[1],
                de_engine="de-test",
                pe_reads=[],
                de_reads=[],
                cached_tokens=0,
                params=params,
            )
        )


def test_tokens_go_out_before_the_finished_the_writer_thread_sends(de: tuple[DecodeWorker, _Sent]) -> None:
    worker, sent = de
    prompt = list(range(1, BS + 5))
    worker.handle(Admit(req_id="a", prompt_len=len(prompt), reads=[], cached_tokens=0))
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    worker.handle(
        Decode(req_id="a", token_ids=[*prompt, 7], params=params, tenant="t", stored_blocks=0, persist=True)
    )
    while worker.has_work:
        for message in worker.step():  # as the process loop sends them
            sent(message)
    sent.wait_for(Finished)
    kinds = [type(m) for m in sent.messages if isinstance(m, (Tokens, Finished))]
    assert kinds == [Tokens, Tokens, Finished]
    finished = sent.messages[-1]
    assert isinstance(finished, Finished) and finished.persisted == 2  # a Full Block and the partial one
