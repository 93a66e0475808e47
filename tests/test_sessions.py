"""The public session API end to end, over each face: sync, async on asyncio, async on trio, and
over each kind of cluster: embedded (`Cluster.local`) and behind a gateway (`Cluster.connect`).

`Face` runs a step the way a program of that kind would; the suite is parametrized over the faces
and the clusters and asserts the same behaviour of each.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

import dualpath_sdk as dp
from dualpath_sdk.api.cluster import Cluster
from dualpath_sdk.api.remote import RemoteCluster
from dualpath_sdk.config import EngineConfig, StoreConfig
from dualpath_sdk.gateway import create_app
from dualpath_sdk.gateway.serve import in_thread
from tests.conftest import Pair, hf_greedy

AnyCluster = Cluster | RemoteCluster

BLOCK = 16


class Face:
    """One way to drive a session: `step` and `stream` return what the sync face would."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seed = ["sync", "asyncio", "trio"].index(name) * 1000  # distinct prompts: no sharing

    def _run(self, fn: Callable[[], Any]) -> Any:
        if self.name == "sync":
            return fn()
        return anyio.run(fn, backend=self.name)

    def step(self, session: dp.Session, tokens: list[int], **options: Any) -> dp.StepResult:
        if self.name == "sync":
            return session.step_tokens(tokens, **options)
        return self._run(lambda: session.astep_tokens(tokens, **options))

    def chat(self, session: dp.Session, turn: Any, **options: Any) -> dp.StepResult:
        if self.name == "sync":
            return session.step(turn, **options)
        return self._run(lambda: session.astep(turn, **options))

    def stream_text(self, session: dp.Session, turn: Any, **options: Any) -> list[str]:
        if self.name == "sync":
            return [c.text for c in session.stream(turn, **options)]

        async def collect() -> list[str]:
            return [c.text async for c in session.astream(turn, **options)]

        return self._run(collect)


@pytest.fixture(params=["sync", "asyncio", "trio"])
def face(request: pytest.FixtureRequest) -> Face:
    return Face(request.param)


@pytest.fixture(scope="module", params=["local", "remote"])
def cluster(
    chat_pair: Pair, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[AnyCluster]:
    engine = EngineConfig(block_size=BLOCK, num_blocks=256)
    with Cluster.local(chat_pair.path, storage=tmp_path_factory.mktemp("store"), engine=engine) as running:
        if request.param == "local":
            yield running
            return
        with in_thread(create_app(running)) as url, Cluster.connect(url) as remote:
            yield remote


@pytest.fixture(scope="module")
def tokenizer(chat_pair: Pair) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(chat_pair.path)


def _reusable(history: list[int]) -> int:
    """Tokens of a history whose KV the next turn loads: all but the last sampled one (whose KV the
    next turn computes), a partial last block included."""
    return max(len(history) - 1, 0)


def _tokens(seed: int, n: int) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_turns_are_exact_and_reuse_the_history(cluster: AnyCluster, chat_pair: Pair, face: Face) -> None:
    session = cluster.session()
    for turn in range(3):
        before, new = session.token_ids, _tokens(face.seed + turn, 37)
        result = face.step(session, new, max_tokens=10, ignore_eos=True)
        assert result.token_ids == hf_greedy(chat_pair, before + new, 10)
        assert session.token_ids == before + new + result.token_ids
        assert result.usage.cached_tokens == _reusable(before)


def test_chat_turns_and_streams_agree(cluster: AnyCluster, face: Face) -> None:
    streamed = cluster.session(system="You are terse.")
    stepped = cluster.session(system="You are terse.")
    for turn in ("run the tests", "3 failed: fix them"):
        text = "".join(face.stream_text(streamed, turn, max_tokens=6, ignore_eos=True))
        assert text == face.chat(stepped, turn, max_tokens=6, ignore_eos=True).text
    assert streamed.token_ids == stepped.token_ids
    assert [m["role"] for m in streamed.messages] == ["system", "user", "assistant", "user", "assistant"]


def test_creating_and_resuming_are_two_calls(cluster: AnyCluster) -> None:
    session = cluster.session(session_id="chosen-id")
    session.step_tokens([1, 2, 3], max_tokens=2)
    with pytest.raises(dp.InvalidInput, match="exists"):
        cluster.session(session_id="chosen-id")
    assert cluster.resume("chosen-id").token_ids == session.token_ids
    with pytest.raises(dp.SessionNotFound):
        cluster.resume("no-such-session")
    assert len(cluster.session().id) >= 32  # unguessable: 128 random bits


def test_tenants_see_only_their_own_sessions_and_share_no_blocks(cluster: AnyCluster, face: Face) -> None:
    a = cluster.session(tenant=f"a-{face.name}")
    b = cluster.session(tenant=f"b-{face.name}")
    prompt = _tokens(face.seed + 50, 3 * BLOCK + 5)
    ra, rb = face.step(a, prompt, max_tokens=4), face.step(b, prompt, max_tokens=4)
    assert ra.token_ids == rb.token_ids  # the same model and prompt...
    assert rb.usage.cached_tokens == 0  # ...and none of a's blocks
    again = face.step(b, [7], max_tokens=2)
    assert again.usage.cached_tokens > 0  # b reuses its own blocks
    with pytest.raises(dp.SessionNotFound):
        cluster.resume(a.id, tenant=b.tenant)
    assert cluster.resume(a.id, tenant=a.tenant).token_ids == a.token_ids
    assert cluster.sessions(tenant=a.tenant) == [a.id]
    child = a.fork()
    assert cluster.sessions(tenant=a.tenant) == [a.id, child.id]
    assert b.id not in cluster.sessions(tenant=a.tenant)


def test_a_broken_stream_leaves_the_session_as_it_was(cluster: AnyCluster, chat_pair: Pair) -> None:
    session = cluster.session(system="You are terse.")
    session.step("hello", max_tokens=4, ignore_eos=True)
    before, messages = session.token_ids, session.messages
    for i, _ in enumerate(session.stream("tell me a long story", max_tokens=300, ignore_eos=True)):
        if i == 3:
            break
    assert session.token_ids == before and session.messages == messages
    assert cluster.resume(session.id).token_ids == before
    result = session.step_tokens(_tokens(60, 20), max_tokens=8, ignore_eos=True)
    assert result.usage.cached_tokens == _reusable(before)  # the cache is intact
    assert result.token_ids == hf_greedy(chat_pair, before + _tokens(60, 20), 8)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_cancelled_async_stream_leaves_the_session_as_it_was(
    cluster: AnyCluster, chat_pair: Pair, backend: str
) -> None:
    session = cluster.session(system=f"You are terse ({backend}).")  # no history shared across backends
    session.step("hello", max_tokens=4, ignore_eos=True)
    before = session.token_ids

    async def main() -> int:
        seen = 0
        with anyio.move_on_after(0.5):  # the task is cancelled mid-stream
            async for _ in session.astream("tell me a long story", max_tokens=1500, ignore_eos=True):
                seen += 1
        return seen

    assert anyio.run(main, backend=backend) > 0
    assert session.token_ids == before
    result = session.step_tokens(_tokens(72, 10), max_tokens=8, ignore_eos=True)  # the next step works
    assert result.token_ids == hf_greedy(chat_pair, before + _tokens(72, 10), 8)
    assert result.usage.cached_tokens == _reusable(before)


def test_the_async_face_never_blocks_the_event_loop(cluster: AnyCluster) -> None:
    session = cluster.session()
    gaps: list[float] = []

    async def main() -> None:
        async def tick() -> None:
            last = time.perf_counter()
            while True:
                await anyio.sleep(0.01)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        async with anyio.create_task_group() as tg:
            tg.start_soon(tick)
            for turn in range(3):
                await session.astep_tokens(_tokens(80 + turn, 50), max_tokens=30, ignore_eos=True)
            tg.cancel_scope.cancel()

    anyio.run(main)
    assert len(gaps) > 20
    assert max(gaps) < 0.25, f"the loop stalled for {max(gaps):.3f} s"


def test_many_async_agents_at_once_are_exact(cluster: AnyCluster, chat_pair: Pair) -> None:
    sessions = [cluster.session() for _ in range(6)]
    results: dict[int, dp.StepResult] = {}

    async def agent(i: int) -> None:
        results[i] = await sessions[i].astep_tokens(_tokens(90 + i, 30), max_tokens=12, ignore_eos=True)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for i in range(len(sessions)):
                tg.start_soon(agent, i)

    anyio.run(main)
    for i in range(len(sessions)):
        assert results[i].token_ids == hf_greedy(chat_pair, _tokens(90 + i, 30), 12)


def test_a_lapsed_ttl_unpins_but_the_session_still_resumes(chat_pair: Pair, tmp_path: Path) -> None:
    block_file = 4096 + 3 * BLOCK * 2 * 2 * 16 * 4  # header + the tiny model's Full Block
    store = StoreConfig(root=tmp_path, capacity_bytes=8 * block_file)
    engine = EngineConfig(block_size=BLOCK, num_blocks=256)
    with Cluster.local(chat_pair.path, store=store, engine=engine) as cluster:
        brief = cluster.session(ttl_s=0.2)
        brief.step_tokens(_tokens(100, 4 * BLOCK + 3), max_tokens=4, ignore_eos=True)
        kept = cluster.session()
        time.sleep(0.3)  # brief's pins lapse; kept's new blocks evict them
        kept.step_tokens(_tokens(101, 6 * BLOCK + 3), max_tokens=4, ignore_eos=True)
        resumed = cluster.resume(brief.id)
        prompt = [*resumed.token_ids, 5, 6]
        result = resumed.step_tokens([5, 6], max_tokens=6, ignore_eos=True)
        assert result.usage.cached_tokens < 4 * BLOCK  # evicted blocks were recomputed
        assert result.token_ids == hf_greedy(chat_pair, prompt, 6)


# ---- tools and stop strings ------------------------------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "run_tests",
            "description": "Run the test suite",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}},
        },
    }
]


def test_tools_reach_the_template_and_tool_results_continue_the_cache(
    cluster: AnyCluster, face: Face, tokenizer: PreTrainedTokenizerBase
) -> None:
    session = cluster.session(system=f"You are a coding agent ({face.name}).")
    face.chat(session, "run the tests", max_tokens=6, tools=TOOLS)
    prompt_text = tokenizer.decode(session.token_ids)
    assert "run_tests" in prompt_text and "<tool_call>" in prompt_text  # the schema and the protocol
    call = {"id": "c1", "type": "function", "function": {"name": "run_tests", "arguments": '{"path": "."}'}}
    history = session.token_ids
    result = face.chat(
        session,
        [
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {
                "role": "tool",
                "tool_call_id": "c1",
                "content": [{"type": "text", "text": "3 failed, 9 passed"}],
            },
        ],
        max_tokens=4,
    )
    assert session.token_ids[: len(history)] == history  # the history was appended to, never re-rendered
    assert "3 failed, 9 passed" in tokenizer.decode(session.token_ids)
    assert result.usage.cached_tokens == _reusable(history)
    with pytest.raises(dp.InvalidInput, match="tools are fixed"):
        face.chat(session, "again", tools=[{**TOOLS[0], "function": {"name": "other"}}])


@pytest.mark.parametrize(
    "bad",
    [
        {"role": "tool", "content": None},
        {"role": "user", "content": None, "tool_calls": []},
        {
            "role": "user",
            "content": "x",
            "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "{}"}}],
        },
        {
            "role": "assistant",
            "tool_calls": [{"id": "a", "function": {"name": "bad name", "arguments": "{}"}}],
        },
        {"role": "user", "content": [{"type": "image", "url": "x"}]},
    ],
)
def test_malformed_tool_messages_are_invalid_input(cluster: AnyCluster, bad: dict[str, Any]) -> None:
    with pytest.raises(dp.InvalidInput):
        cluster.session().step(bad)


def test_a_stop_string_ends_the_reply_early_and_exactly(cluster: AnyCluster, face: Face) -> None:
    base = cluster.session(system=f"Stop strings ({face.name}).")
    base.step("hello", max_tokens=2, ignore_eos=True)
    free, stopped = base.fork(), base.fork()
    full = face.chat(free, "go on", max_tokens=40, ignore_eos=True).text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop and stop in full
    result = face.chat(stopped, "go on", max_tokens=40, ignore_eos=True, stop=[stop])
    assert result.text == full[: full.index(stop)]
    assert result.finish_reason == "stop" and result.usage.completion_tokens < 40
    assert stopped.messages[-1] == {"role": "assistant", "content": result.text or None}
    again = face.chat(stopped, "and then?", max_tokens=3)  # the session goes on from what was kept
    assert again.usage.cached_tokens > 0


def test_metrics_count_what_the_steps_returned(cluster: AnyCluster) -> None:
    from prometheus_client import generate_latest

    def value(name: str, **labels: str) -> float:
        return cluster.metrics().get_sample_value(name, labels) or 0.0

    before = {k: value("dualpath_tokens_total", kind=k) for k in ("prompt", "cached", "generated")}
    ttft_count = value("dualpath_ttft_seconds_count")
    session = cluster.session()
    results = [session.step_tokens(_tokens(110 + i, 30), max_tokens=5, ignore_eos=True) for i in range(3)]
    assert value("dualpath_tokens_total", kind="prompt") - before["prompt"] == sum(
        r.usage.prompt_tokens for r in results
    )
    assert value("dualpath_tokens_total", kind="cached") - before["cached"] == sum(
        r.usage.cached_tokens for r in results
    )
    assert value("dualpath_tokens_total", kind="generated") - before["generated"] == 15
    assert value("dualpath_ttft_seconds_count") - ttft_count == 3

    def hits() -> float:
        return sum(value("dualpath_store_block_reads", engine=e, result="hit") for e in ("pe0", "de0"))

    deadline = time.monotonic() + 10  # an engine's report may trail its step's end
    while hits() < sum(r.usage.cached_tokens for r in results) // BLOCK:  # the engines read what was cached
        assert time.monotonic() < deadline, hits()
        time.sleep(0.05)
    text = generate_latest(cluster.metrics())  # the Prometheus text format
    assert b"dualpath_engine_free_tokens" in text and b"dualpath_buffer_used_ratio" in text


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_cluster_calls_have_async_twins(cluster: AnyCluster, backend: str) -> None:
    async def main() -> None:
        session = await cluster.asession(system=f"Twins ({backend}).")
        await session.astep("hello", max_tokens=2)
        again = await cluster.aresume(session.id)
        assert again.token_ids == session.token_ids and len(again.token_ids) > 0
        assert session.id in await cluster.asessions()

    anyio.run(main, backend=backend)
