"""The LlamaIndex adapter (integrations/llamaindex_dualpath): DualPathLLM on an embedded cluster and
on the same cluster behind the gateway (`Cluster.connect`).

LlamaIndex resends the whole conversation on every call; each call must continue the session that
holds it (cached tokens grow turn by turn), fork on an edited earlier message, and carry tool calls
and results through the session. The model is a tiny random Llama with the default model's chat
template: its replies are gibberish but deterministic (greedy), so replies can be compared.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from llama_index.core.base.llms.types import ChatMessage, ChatResponse, MessageRole, TextBlock, ToolCallBlock
from llama_index.core.tools import FunctionTool
from llama_index.core.tools.calling import call_tool_with_selection
from llamaindex_dualpath import DualPathLLM, to_dualpath_messages
from llamaindex_dualpath.llm import _response
from transformers import AutoTokenizer

from dualpath_sdk.api.cluster import Cluster
from dualpath_sdk.api.history import canonical
from dualpath_sdk.api.remote import RemoteCluster
from dualpath_sdk.api.result import Load, Persist, StepResult, Timings, Usage
from dualpath_sdk.config import EngineConfig
from dualpath_sdk.gateway import create_app
from dualpath_sdk.gateway.serve import in_thread
from tests.conftest import Pair

Target = Cluster | RemoteCluster
SYSTEM = ChatMessage(role=MessageRole.SYSTEM, content="You are terse.")


def get_weather(city: str) -> str:
    """The weather in a city."""
    return json.dumps({"city": city, "temperature": 21})


WEATHER = FunctionTool.from_defaults(fn=get_weather)


@pytest.fixture(scope="module")
def local(chat_pair: Pair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    engine = EngineConfig(block_size=16, num_blocks=256)
    with Cluster.local(chat_pair.path, storage=tmp_path_factory.mktemp("store"), engine=engine) as running:
        yield running


@pytest.fixture(scope="module", params=["local", "remote"])
def target(request: pytest.FixtureRequest, local: Cluster) -> Iterator[Target]:
    """The embedded cluster, or the same cluster behind a gateway (tenants keep the two apart)."""
    if request.param == "local":
        yield local
        return
    with in_thread(create_app(local)) as url, Cluster.connect(url) as remote:
        yield remote


@pytest.fixture
def kind(target: Target) -> str:
    return "remote" if isinstance(target, RemoteCluster) else "local"


def _user(text: str) -> ChatMessage:
    return ChatMessage(role=MessageRole.USER, content=text)


def _llm(target: Target, tenant: str, **kw: Any) -> DualPathLLM:
    return DualPathLLM(cluster=target, tenant=tenant, **{"max_tokens": 6, **kw})


def _reply_text(target: Target, session_id: str, tenant: str, chat_pair: Pair) -> str:
    """What the session's last reply is, as the model saw it (its tokens after the last opening)."""
    tokenizer = AutoTokenizer.from_pretrained(chat_pair.path)
    text = tokenizer.decode(target.resume(session_id, tenant).token_ids)
    return str(text.split("<|im_start|>assistant\n")[-1])


def test_a_conversation_resent_whole_continues_one_session(target: Target, kind: str) -> None:
    tenant = f"growth-{kind}"
    llm = _llm(target, tenant)
    history = [SYSTEM]
    cached, prompt, completion, sessions = [], [], [], set()
    for turn in range(4):
        history.append(_user(f"question number {turn}: what comes next?"))
        r = llm.chat(history)
        info = r.additional_kwargs
        assert r.raw["usage"]["cached_tokens"] == info["cached_tokens"]
        assert r.raw["usage"]["prompt_tokens"] == info["prompt_tokens"]
        assert r.raw["session_id"] == info["session_id"] and info["read_plan"] == r.raw["load"]["plan"]
        cached.append(info["cached_tokens"])
        prompt.append(info["prompt_tokens"])
        completion.append(info["completion_tokens"])
        sessions.add(info["session_id"])
        history.append(r.message)
    assert len(sessions) == 1, "every call continues the one session"
    assert cached[0] == 0
    for k in range(1, 4):  # the whole previous turn is reloaded, but for the last sampled token's KV
        assert cached[k] == prompt[k - 1] + completion[k - 1] - 1, (k, cached, prompt, completion)
        assert prompt[k] > cached[k] > cached[k - 1]
    (sid,) = sessions
    session = target.resume(sid, tenant)
    assert [m.get("content") or None for m in session.messages] == [m.content or None for m in history]


def test_streaming_and_async_faces_give_the_same_replies(target: Target, kind: str) -> None:
    question = [SYSTEM, _user("tell me a story about a lighthouse")]
    reference = _llm(target, f"ref-{kind}", max_tokens=10).chat(question)
    text = reference.message.content
    assert text

    llm = _llm(target, f"stream-{kind}", max_tokens=10)
    responses = list(llm.stream_chat(question))
    *partial, last = responses
    assert "".join(r.delta or "" for r in responses) == text == last.message.content
    assert all(
        r.message.content == "".join(p.delta or "" for p in responses[: i + 1]) for i, r in enumerate(partial)
    )
    assert last.additional_kwargs["completion_tokens"] == reference.additional_kwargs["completion_tokens"]
    assert last.additional_kwargs["cached_tokens"] == 0  # another tenant: nothing shared
    sid = last.additional_kwargs["session_id"]

    async def main() -> tuple[ChatResponse, list[ChatResponse]]:
        history = [*question, last.message, _user("and then?")]
        turn2 = await llm.achat(history)
        history += [turn2.message, _user("and after that?")]
        stream = await llm.astream_chat(history)
        return turn2, [r async for r in stream]

    turn2, streamed = anyio.run(main)
    assert turn2.additional_kwargs["session_id"] == sid == streamed[-1].additional_kwargs["session_id"]
    assert (
        turn2.additional_kwargs["cached_tokens"]
        == last.additional_kwargs["prompt_tokens"] + last.additional_kwargs["completion_tokens"] - 1
    )
    assert streamed[-1].additional_kwargs["cached_tokens"] > turn2.additional_kwargs["prompt_tokens"]
    assert "".join(r.delta or "" for r in streamed) == streamed[-1].message.content

    # completion: a prompt is one user message (a new session each: one message holds no prefix)
    done = llm.complete("tell me a story about a lighthouse")
    chunks = list(llm.stream_complete("tell me a story about a lighthouse"))
    adone = anyio.run(llm.acomplete, "tell me a story about a lighthouse")

    async def astream() -> list[Any]:
        return [c async for c in await llm.astream_complete("tell me a story about a lighthouse")]

    achunks = anyio.run(astream)
    assert done.text == chunks[-1].text == adone.text == achunks[-1].text == "".join(c.delta for c in chunks)
    assert done.additional_kwargs["session_id"] != adone.additional_kwargs["session_id"]
    assert done.raw["usage"]["completion_tokens"] == achunks[-1].additional_kwargs["completion_tokens"]


def test_a_tool_loop_continues_the_session(target: Target, kind: str, chat_pair: Pair) -> None:
    """The tiny model does not choose a tool: `tool_required` forces the reply to open a call. Its
    gibberish seldom completes one; then the loop plays the part of an agent that forces the call
    (an assistant message with the call, after the model's reply), as examples/tool_agent.py does."""
    tenant = f"tools-{kind}"
    llm = _llm(target, tenant, max_tokens=12)
    history = [SYSTEM, _user("what is the weather in Paris?")]
    r1 = llm.chat_with_tools([WEATHER], chat_history=history, tool_required=True)
    sid = r1.additional_kwargs["session_id"]
    assert _reply_text(target, sid, tenant, chat_pair).startswith('<tool_call>\n{"name": "')
    assert "get_weather" in str(target.resume(sid, tenant).tools)

    # streamed (another tenant), the same reply; what may be a call is held back, never streamed
    streamed = list(
        _llm(target, f"tools-stream-{kind}", max_tokens=12).stream_chat_with_tools(
            [WEATHER], chat_history=history, tool_required=True
        )
    )
    assert "".join(r.delta or "" for r in streamed) == streamed[-1].message.content == r1.message.content
    assert not any("<tool_call>" in (r.message.content or "") for r in streamed[:-1])

    calls = llm.get_tool_calls_from_response(r1, error_on_no_tool_call=False)
    history.append(r1.message)
    if not calls:  # no well-formed call: the agent's forced one
        forced = ToolCallBlock(tool_call_id="call_1", tool_name="get_weather", tool_kwargs={"city": "Paris"})
        history.append(ChatMessage(role=MessageRole.ASSISTANT, blocks=[forced]))
        calls = llm.get_tool_calls_from_response(ChatResponse(message=history[-1]))
    output = call_tool_with_selection(calls[0], [WEATHER])
    assert not output.is_error
    history.append(
        ChatMessage(
            role=MessageRole.TOOL,
            content=output.content,
            additional_kwargs={"tool_call_id": calls[0].tool_id},
        )
    )

    r2 = llm.chat_with_tools([WEATHER], chat_history=history)
    assert r2.additional_kwargs["session_id"] == sid, "the tool result continues the session"
    held = r1.additional_kwargs["prompt_tokens"] + r1.additional_kwargs["completion_tokens"]
    assert r2.additional_kwargs["cached_tokens"] == held - 1
    session = target.resume(sid, tenant)
    assert session.messages[-2]["role"] == "tool" and session.messages[-2]["tool_call_id"] == calls[0].tool_id
    assert output.content in session.messages[-2]["content"]

    # named choices: a tool's name (LlamaIndex's form) makes the reply open a call of that tool
    named = _llm(target, f"named-{kind}").chat_with_tools(
        [WEATHER], chat_history=[_user("weather?")], tool_choice="get_weather"
    )
    opening = '<tool_call>\n{"name": "get_weather", "arguments":'
    assert _reply_text(target, named.additional_kwargs["session_id"], f"named-{kind}", chat_pair).startswith(
        opening
    )


def test_a_reply_with_tool_calls_resent_matches_the_session() -> None:
    calls = [
        {
            "id": "call_a",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
        },
        {
            "id": "call_b",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
        },
    ]
    result = StepResult(
        "",
        [1],
        "tool_calls",
        Usage(10, 4, 1),
        Load("pe", 1, 0),
        Persist(0, 0),
        Timings(0, 0, 0, 0, 0, 0),
        calls,
    )

    class _S:
        id = "s1"

    r = _response(_S(), result)  # type: ignore[arg-type]
    (sent,) = to_dualpath_messages([r.message])
    stored = {"role": "assistant", "content": None, "tool_calls": calls}  # as the session holds it
    assert canonical(sent) == canonical(stored)
    llm = DualPathLLM.model_construct()
    selections = llm.get_tool_calls_from_response(r)
    assert [(s.tool_id, s.tool_name, s.tool_kwargs) for s in selections] == [
        ("call_a", "get_weather", {"city": "Oslo"}),
        ("call_b", "get_weather", {"city": "Rome"}),
    ]
    single = llm._validate_chat_with_tools_response(r.model_copy(deep=True), [WEATHER])
    assert [b.tool_call_id for b in single.message.blocks if isinstance(b, ToolCallBlock)] == ["call_a"]
    # OpenAI-shaped calls in additional_kwargs (another LLM's reply in the history) are read too
    other = ChatMessage(role=MessageRole.ASSISTANT, content="", additional_kwargs={"tool_calls": calls})
    assert canonical(to_dualpath_messages([other])[0]) == canonical(stored)
    with pytest.raises(ValueError, match="0 tool calls"):
        llm.get_tool_calls_from_response(
            ChatResponse(message=ChatMessage(role="assistant", blocks=[TextBlock(text="x")]))
        )


def test_an_edited_message_forks_and_the_original_is_unchanged(target: Target, kind: str) -> None:
    tenant, fresh_tenant = f"edits-{kind}", f"fresh-{kind}"
    llm = _llm(target, tenant)
    history = [SYSTEM]
    for text in ["first question", "second question", "third question"]:
        history.append(_user(text))
        r = llm.chat(history)
        history.append(r.message)
    original = r.additional_kwargs["session_id"]
    before = target.resume(original, tenant)

    edited = [*history[:3], _user("an edited second question")]
    forked = llm.chat(edited)
    assert forked.additional_kwargs["session_id"] != original
    assert forked.additional_kwargs["cached_tokens"] > 0  # the first turn's KV, from the fork

    fresh_llm, fresh = _llm(target, fresh_tenant), [SYSTEM]  # the edited conversation from scratch
    for message in edited[1:]:
        if message.role == MessageRole.USER:
            fresh.append(message)
            f = fresh_llm.chat(fresh)
            fresh.append(f.message)
    assert [m.content for m in fresh[:4]] == [m.content for m in edited], "greedy: the same first reply"
    assert forked.message.content == f.message.content
    assert forked.raw["token_ids"] == f.raw["token_ids"]

    after = target.resume(original, tenant)
    assert (after.messages, after.token_ids, after.version) == (
        before.messages,
        before.token_ids,
        before.version,
    )
    cont = llm.chat([*history, _user("fourth question")])
    assert cont.additional_kwargs["session_id"] == original
    assert cont.additional_kwargs["cached_tokens"] == len(before.token_ids) - 1


def test_metadata_and_a_named_session(target: Target, kind: str, local: Cluster, chat_pair: Pair) -> None:
    llm = _llm(target, f"named-session-{kind}", session_id=f"my-session-{kind}")
    meta = llm.metadata
    assert meta.is_function_calling_model and meta.is_chat_model and meta.num_output == 6
    assert meta.model_name == chat_pair.path.name
    assert meta.context_window == local.max_context == 2048  # a gateway lists it in /v1/models
    assert _llm(target, "x", context_window=777).metadata.context_window == 777

    first = llm.chat([_user("hello there")])
    assert first.additional_kwargs["session_id"] == f"my-session-{kind}"
    again = llm.chat([_user("hello there"), first.message, _user("and you?")], max_tokens=3)
    assert again.additional_kwargs["session_id"] == f"my-session-{kind}"
    assert again.additional_kwargs["completion_tokens"] <= 3 and again.additional_kwargs["cached_tokens"] > 0
