"""api/history.py: whole histories mapped onto sessions through its sync and async faces, on an
embedded cluster and on one behind the gateway (tiny random Llama with the real chat template)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

import dualpath_sdk as dp
from dualpath_sdk.api.history import History
from dualpath_sdk.api.remote import RemoteCluster
from dualpath_sdk.api.result import StepChunk, StepResult
from dualpath_sdk.config import EngineConfig
from dualpath_sdk.gateway import Keys, create_app
from dualpath_sdk.gateway.serve import in_thread
from tests.conftest import Pair

GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 6}
KEY = "key-for-tenant-h-0001"


@pytest.fixture(scope="module")
def local(chat_pair: Pair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dp.Cluster]:
    engine = EngineConfig(block_size=16, num_blocks=256)
    with dp.Cluster.local(chat_pair.path, storage=tmp_path_factory.mktemp("store"), engine=engine) as c:
        yield c


@pytest.fixture(scope="module")
def remote(local: dp.Cluster) -> Iterator[RemoteCluster]:
    """Behind a gateway with a key: tenant None is the key's ("keyed")."""
    with in_thread(create_app(local, keys=Keys({KEY: "keyed"}))) as url, dp.Cluster.connect(url, KEY) as c:
        yield c


def _run(events: Iterator[StepChunk | StepResult]) -> StepResult:
    *chunks, result = list(events)
    assert all(isinstance(c, StepChunk) for c in chunks) and isinstance(result, StepResult)
    return result


@pytest.mark.parametrize("kind", ["local", "remote"])
def test_sync_and_async_faces_continue_one_session(kind: str, request: pytest.FixtureRequest) -> None:
    cluster = request.getfixturevalue(kind)
    history = History(cluster)
    messages: list[dict[str, Any]] = [{"role": "user", "content": "first question"}]
    session, events = history.step(messages, **GREEDY)
    first = _run(events)
    assert session.tenant == ("default" if kind == "local" else "keyed")
    messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "second"}]

    async def main() -> tuple[dp.Session, StepResult]:
        s, aevents = await history.astep(messages, **GREEDY)
        items = [item async for item in aevents]
        assert isinstance(items[-1], StepResult)
        return s, items[-1]

    again, second = anyio.run(main)
    assert again.id == session.id
    assert second.usage.cached_tokens == first.usage.prompt_tokens + first.usage.completion_tokens - 1
    # a History made later finds the conversation in the store
    messages += [{"role": "assistant", "content": second.text}, {"role": "user", "content": "third"}]
    later, events = History(cluster).step(messages, **GREEDY)
    assert later.id == session.id and _run(events).usage.cached_tokens > 0


def test_a_step_closed_early_leaves_the_session_as_it_was(local: dp.Cluster) -> None:
    history = History(local)
    messages: list[dict[str, Any]] = [{"role": "user", "content": "a question"}]
    session, events = history.step(messages, tenant="closed", **GREEDY)
    reply = _run(events)
    messages += [{"role": "assistant", "content": reply.text}, {"role": "user", "content": "more"}]
    version = local.resume(session.id, "closed").version
    same, events = history.step(messages, tenant="closed", max_tokens=32, ignore_eos=True)
    assert same.id == session.id
    with events:
        assert isinstance(next(events), StepChunk)  # the first event only, then the step is cancelled
    after = local.resume(session.id, "closed")
    assert (after.version, len(after.messages)) == (version, 2)
    again, events = history.step(messages, tenant="closed", **GREEDY)  # still the session to continue
    assert again.id == session.id and _run(events).usage.cached_tokens > 0


def test_two_threads_sending_one_history_both_get_a_reply(local: dp.Cluster) -> None:
    """One continues the session in place; the other finds it busy and gets a fork."""
    history = History(local)
    messages: list[dict[str, Any]] = [{"role": "user", "content": "shared start"}]
    session, events = history.step(messages, tenant="threads", **GREEDY)
    reply = _run(events)
    messages += [{"role": "assistant", "content": reply.text}, {"role": "user", "content": "next"}]
    got: list[tuple[str, StepResult]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def ask() -> None:
        try:
            barrier.wait()
            s, ev = history.step(messages, tenant="threads", max_tokens=16, ignore_eos=True)
            got.append((s.id, _run(ev)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(got) == 2 and session.id in {sid for sid, _ in got}
    assert {r.text for _, r in got} == {got[0][1].text}, "greedy: the same reply either way"
    assert all(r.usage.cached_tokens > 0 for _, r in got)
