"""The OpenAI-compatible endpoint through the real `openai` client: whole histories mapped onto
sessions (continued in place, forked on an edit), streaming, tools, errors and tenants.

The model is a tiny random Llama with a real chat template: its replies are gibberish, but
deterministic under greedy decoding, so a reply can be compared with another one's.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx
import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from dualpath_sdk.api.cluster import Cluster
from dualpath_sdk.api.flow import Commit, Emit, Lookup, Receive, prepare, step_flow
from dualpath_sdk.api.history import canonical, digests
from dualpath_sdk.api.inputs import StepOptions
from dualpath_sdk.api.result import Load, Persist, StepChunk, StepResult, Timings, Usage
from dualpath_sdk.cluster.controller import StepOutcome
from dualpath_sdk.config import EngineConfig
from dualpath_sdk.errors import EngineUnavailable, InvalidInput
from dualpath_sdk.gateway import Keys, create_app
from dualpath_sdk.gateway.completions import ChatRequest, parse, stream_chunks
from dualpath_sdk.gateway.serve import in_thread
from dualpath_sdk.model.tools import HeldText
from dualpath_sdk.store.manifest import SessionManifest
from tests.conftest import Pair

KEY_A, KEY_B = "key-for-tenant-a-0001", "key-for-tenant-b-0001"
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 6}
WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def cluster(chat_pair: Pair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    engine = EngineConfig(block_size=16, num_blocks=256)
    with Cluster.local(chat_pair.path, storage=tmp_path_factory.mktemp("store"), engine=engine) as running:
        yield running


@pytest.fixture(scope="module")
def url(cluster: Cluster) -> Iterator[str]:
    with in_thread(create_app(cluster)) as served:
        yield served + "/v1"


@pytest.fixture(scope="module")
def keyed_url(cluster: Cluster) -> Iterator[str]:
    with in_thread(create_app(cluster, keys=Keys({KEY_A: "a", KEY_B: "b"}))) as served:
        yield served + "/v1"


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def model(chat_pair: Pair) -> str:
    return chat_pair.path.name


@pytest.fixture(scope="module")
def tokenizer(chat_pair: Pair) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(chat_pair.path)


def _user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def _ask(client: openai.OpenAI, model: str, messages: list[Any], tenant: str, **kw: Any) -> Any:
    extra = {"tenant": tenant, **kw.pop("extra_body", {})}
    return client.chat.completions.create(
        model=model, messages=messages, extra_body=extra, **{**GREEDY, **kw}
    )


def test_models_lists_the_served_model_and_only_it_is_served(client: openai.OpenAI, model: str) -> None:
    (listed,) = client.models.list().data
    assert listed.id == model and listed.object == "model"
    with pytest.raises(openai.BadRequestError, match="not served here"):
        client.chat.completions.create(model="gpt-4o", messages=[_user("hi")])


def test_cached_tokens_grow_over_a_ten_turn_conversation(
    client: openai.OpenAI, model: str, cluster: Cluster
) -> None:
    history: list[Any] = [{"role": "system", "content": "You are terse."}]
    cached, prompt, completion, sessions = [], [], [], set()
    for turn in range(10):
        history.append(_user(f"question number {turn}: what comes next?"))
        r = _ask(client, model, history, "growth")
        usage = r.usage
        assert usage is not None and usage.prompt_tokens_details is not None
        cached.append(usage.prompt_tokens_details.cached_tokens)
        prompt.append(usage.prompt_tokens)
        completion.append(usage.completion_tokens)
        sessions.add(r.session_id)
        history.append(r.choices[0].message.model_dump())  # as clients echo it: refusal, audio, ... None
    assert len(sessions) == 1, "every turn continues the one session"
    assert cached[0] == 0
    for k in range(1, 10):  # the whole previous turn is reused, but for the last sampled token's KV
        assert cached[k] == prompt[k - 1] + completion[k - 1] - 1, (k, cached, prompt, completion)
        assert prompt[k] > cached[k]
    (sid,) = sessions
    session = cluster.resume(sid, "growth")
    assert len(session.messages) == len(history) and len(session.marks) == 11
    assert [m["content"] for m in session.messages] == [m["content"] for m in history]


def _converse(
    client: openai.OpenAI, model: str, turns: list[str], tenant: str | None
) -> tuple[list[Any], Any]:
    """The conversation of `turns` sent turn by turn as whole histories: (history, last response);
    tenant None: the key's."""
    history: list[Any] = []
    r = None
    for text in turns:
        history.append(_user(text))
        extra = {} if tenant is None else {"tenant": tenant}
        r = client.chat.completions.create(model=model, messages=history, extra_body=extra, **GREEDY)
        history.append({"role": "assistant", "content": r.choices[0].message.content})
    return history, r


def test_an_edited_message_forks_and_the_original_continues_unchanged(
    url: str, model: str, cluster: Cluster
) -> None:
    async def main() -> None:
        client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0)

        async def ask(messages: list[Any], tenant: str) -> Any:
            return await client.chat.completions.create(
                model=model, messages=messages, extra_body={"tenant": tenant}, **GREEDY
            )

        history: list[Any] = []
        for text in ["first question", "second question", "third question"]:
            history.append(_user(text))
            r = await ask(history, "edits")
            history.append({"role": "assistant", "content": r.choices[0].message.content})
        original = r.session_id
        before = cluster.resume(original, "edits")

        edited = [*history[:2], _user("an edited second question")]
        forked = await ask(edited, "edits")
        assert forked.session_id != original
        assert forked.usage.prompt_tokens_details.cached_tokens > 0  # the first turn's KV, from the fork

        fresh: list[Any] = []  # the edited conversation from scratch, in a tenant that shares nothing
        for message in edited:
            if message["role"] == "user":
                fresh.append(message)
                f = await ask(fresh, "fresh")
                fresh.append({"role": "assistant", "content": f.choices[0].message.content})
        assert fresh[:3] == edited, "greedy: the fresh first reply is the original's"
        assert f.usage.prompt_tokens_details.cached_tokens > 0  # a second turn of its own session
        assert forked.choices[0].message.content == f.choices[0].message.content

        after_fork = cluster.resume(original, "edits")
        assert (after_fork.messages, after_fork.version) == (before.messages, before.version)
        assert cluster.manifests.load(forked.session_id).parent_id == original
        child = cluster.resume(forked.session_id, "edits")
        assert child.marks[:2] == before.marks[:2]
        assert (
            child.messages[:3] == edited
            and child.token_ids[: before.marks[1][1]] == before.token_ids[: before.marks[1][1]]
        )

        cont = await ask([*history, _user("fourth question")], "edits")
        assert cont.session_id == original
        assert cont.usage.prompt_tokens_details.cached_tokens == len(before.token_ids) - 1
        resumed = cluster.resume(original, "edits")
        assert resumed.messages[:6] == before.messages and len(resumed.messages) == 8

    anyio.run(main)


def test_streamed_deltas_assemble_to_the_reply_with_usage(url: str, model: str) -> None:
    messages = [_user("tell me a story about a lighthouse")]
    plain = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
    reference = plain.chat.completions.create(
        model=model, messages=messages, extra_body={"tenant": "plain"}, temperature=0, max_tokens=12
    )

    async def main() -> tuple[list[ChatCompletionChunk], str]:
        client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0)
        stream = await client.chat.completions.create(
            model=model,
            messages=messages,
            extra_body={"tenant": "streamed"},
            temperature=0,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        return chunks, stream.response.headers["x-session-id"]

    chunks, header = anyio.run(main)
    *body, last = chunks
    text = "".join(c.choices[0].delta.content or "" for c in body if c.choices)
    assert text == reference.choices[0].message.content and text
    assert body[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in body][-1] == reference.choices[0].finish_reason
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == reference.usage.completion_tokens
    assert last.usage.prompt_tokens_details.cached_tokens == 0  # another tenant: nothing shared
    assert {c.session_id for c in chunks} == {header}

    # the sync client's stream of the next turn continues the streamed session
    history = [*messages, {"role": "assistant", "content": text}, _user("and then?")]
    stream = plain.chat.completions.create(
        model=model,
        messages=history,
        extra_body={"tenant": "streamed"},
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    again = list(stream)
    assert again[-1].usage.prompt_tokens_details.cached_tokens > last.usage.prompt_tokens
    assert again[0].session_id == header


def test_tools_reach_the_template_and_a_tool_result_continues_the_session(
    client: openai.OpenAI, model: str, cluster: Cluster, tokenizer: PreTrainedTokenizerBase
) -> None:
    history: list[Any] = [_user("what is the weather in Paris?")]
    r = _ask(client, model, history, "tools", tools=[WEATHER])
    session = cluster.resume(r.session_id, "tools")
    assert "get_weather" in tokenizer.decode(session.token_ids)
    assert r.choices[0].finish_reason in ("stop", "length")  # gibberish: no well-formed call
    history += [
        r.choices[0].message.model_dump(),
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    again = _ask(client, model, history, "tools", tools=[WEATHER])
    assert again.session_id == r.session_id
    assert again.usage.prompt_tokens_details.cached_tokens == len(session.token_ids) - 1
    text = tokenizer.decode(cluster.resume(r.session_id, "tools").token_ids)
    assert '<tool_response>\n{"temperature": 21}\n</tool_response>' in text

    # other tools are another session's KV: the same history does not continue this one
    other = {"type": "function", "function": {"name": "get_time"}}
    elsewhere = _ask(client, model, history, "tools", tools=[other])
    assert elsewhere.session_id != r.session_id
    assert "get_time" in tokenizer.decode(cluster.resume(elsewhere.session_id, "tools").token_ids)


def test_a_named_tool_choice_makes_the_reply_open_a_call(
    client: openai.OpenAI, model: str, cluster: Cluster, tokenizer: PreTrainedTokenizerBase
) -> None:
    messages = [_user("weather in Rome, please")]
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = _ask(client, model, messages, "choice", tools=[WEATHER], tool_choice=choice)
    text = tokenizer.decode(cluster.resume(r.session_id, "choice").token_ids)
    assert text.split("<|im_start|>assistant\n")[-1].startswith(
        '<tool_call>\n{"name": "get_weather", "arguments":'
    )
    required = _ask(client, model, messages, "choice-required", tools=[WEATHER], tool_choice="required")
    text = tokenizer.decode(cluster.resume(required.session_id, "choice-required").token_ids)
    assert text.split("<|im_start|>assistant\n")[-1].startswith('<tool_call>\n{"name": "')
    with pytest.raises(openai.BadRequestError, match="not one of the tools"):
        _ask(
            client,
            model,
            messages,
            "choice",
            tools=[WEATHER],
            tool_choice={**choice, "function": {"name": "x"}},
        )
    with pytest.raises(openai.BadRequestError, match="needs tools"):
        _ask(client, model, messages, "choice", tool_choice="required")


def _run_flow(cluster: Cluster, reply: str, **options: Any) -> tuple[list[int], str, StepResult]:
    """A step of a new session whose model writes `reply`, driven by hand: (its prompt, the text it
    emitted, its result)."""
    tokenizer = cluster.facts.tokenizer
    assert tokenizer is not None
    step = prepare(
        cluster.facts, SessionManifest(session_id="s"), None, [_user("hi")], StepOptions(**options)
    )
    flow, answer, emitted = step_flow(cluster.facts, SessionManifest(session_id="s"), step), None, ""
    events: list[Any] = [tokenizer.encode(reply, add_special_tokens=False)]
    events.append(StepOutcome("stop", "none", 0, 0, 0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0))
    while True:
        try:
            effect = flow.send(answer)
        except StopIteration as done:
            return step.prompt, emitted, done.value
        answer = None
        if isinstance(effect, Lookup):
            answer = ([], 0)
        elif isinstance(effect, Receive):
            answer = events.pop(0)
        elif isinstance(effect, Emit):
            emitted += effect.chunk.text
        elif isinstance(effect, Commit):
            answer = effect.manifest


def test_tool_choice_reads_forces_or_ignores_tool_calls(cluster: Cluster) -> None:
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    plain_prompt, _, auto = _run_flow(cluster, call, tools=[WEATHER])
    assert auto.finish_reason == "tool_calls" and auto.tool_calls[0]["function"]["name"] == "get_weather"
    _, _, none = _run_flow(cluster, call, tools=[WEATHER], tool_choice="none")
    assert (none.text, none.tool_calls, none.finish_reason) == (call, [], "stop")

    choice = {"type": "function", "function": {"name": "get_weather"}}
    opening = '<tool_call>\n{"name": "get_weather", "arguments":'
    prompt, emitted, named = _run_flow(
        cluster, ' {"city": "Oslo"}}\n</tool_call>', tools=[WEATHER], tool_choice=choice
    )
    tokenizer = cluster.facts.tokenizer
    assert tokenizer is not None
    assert prompt[: len(plain_prompt)] == plain_prompt
    assert tokenizer.decode(prompt[len(plain_prompt) :]) == opening
    assert emitted.startswith(opening) and named.text == ""
    assert named.tool_calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}


def _step_result(text: str, tool_calls: list[dict[str, Any]]) -> StepResult:
    return StepResult(
        text,
        [1, 2],
        "tool_calls" if tool_calls else "stop",
        Usage(10, 4, 2),
        Load("none", 0, 0),
        Persist(0, 0),
        Timings(0, 0, 0, 0, 0, 0),
        tool_calls,
    )


def _sse(pieces: list[str], result: StepResult | Exception, read_calls: bool = True) -> str:
    """The stream the endpoint sends for a step whose text comes in `pieces`, then `result`."""

    async def events() -> AsyncIterator[StepChunk | StepResult]:
        for piece in pieces:
            yield StepChunk(piece, [1])
        if isinstance(result, Exception):
            raise result
        yield result

    async def main() -> bytes:
        chat = ChatRequest([_user("x")], [WEATHER], {}, True, True, None, read_calls)
        head = {"id": "chatcmpl-1", "created": 0, "model": "m", "system_fingerprint": None}
        stream = stream_chunks("/v1/chat/completions", chat, head, events())
        return b"".join([part async for part in stream])

    return anyio.run(main).decode()


def _sse_chunks(pieces: list[str], result: StepResult, read_calls: bool = True) -> list[ChatCompletionChunk]:
    raw = _sse(pieces, result, read_calls)
    assert raw.endswith("data: [DONE]\n\n")
    lines = [line.removeprefix("data: ") for line in raw.split("\n\n") if line and line != "data: [DONE]"]
    return [ChatCompletionChunk.model_validate(json.loads(line)) for line in lines]


def test_a_streamed_tool_call_is_tool_call_deltas_never_markup() -> None:
    call = {
        "id": "call_abc",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    pieces = [
        "Let me ",
        "check. <tool",
        '_call>\n{"name": "get_weather", ',
        '"arguments": {"city": "Oslo"}}',
        "\n</tool_call>",
    ]
    chunks = _sse_chunks(pieces, _step_result("Let me check.", [call]))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "Let me check."
    assert all("<" not in (c.choices[0].delta.content or "") for c in chunks if c.choices)
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(chunk)
    final = state.get_final_completion()
    (got,) = final.choices[0].message.tool_calls or []
    assert (got.id, got.function.name, got.function.arguments) == (
        "call_abc",
        "get_weather",
        '{"city": "Oslo"}',
    )
    assert final.choices[0].finish_reason == "tool_calls"
    assert final.usage is not None and final.usage.prompt_tokens_details.cached_tokens == 4

    # markup that turns out not to be a call is content, in full, once the reply ends
    pieces = ["see <tool_call> for", " details"]
    chunks = _sse_chunks(pieces, _step_result("see <tool_call> for details", []))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "see <tool_call> for details"
    # with tool_choice "none" nothing is held back
    chunks = _sse_chunks(["a <tool", "_call>"], _step_result("a <tool_call>", []), read_calls=False)
    assert [c.choices[0].delta.content for c in chunks[1:3]] == ["a <tool", "_call>"]


def test_an_error_mid_stream_is_an_openai_error_event() -> None:
    raw = _sse(["some ", "text"], EngineUnavailable("the engines died"))
    *chunks, last = [line.removeprefix("data: ") for line in raw.split("\n\n") if line]
    assert "[DONE]" not in raw and len(chunks) == 3  # the role, "some ", "text"
    error = json.loads(last)["error"]
    assert error["message"] == "the engines died" and error["code"] == "EngineUnavailable"


@pytest.mark.parametrize(
    ("pieces", "out"),
    [
        (["hello", " world"], ["hello", " world"]),
        (["hi <", "b>"], ["hi", " <b>"]),
        (["  ", "{", '"name"'], ["", "", ""]),
        (["ok <tool_c", "all>"], ["ok", ""]),
    ],
)
def test_held_text_holds_back_what_may_start_a_call(pieces: list[str], out: list[str]) -> None:
    held = HeldText(hold=True)
    assert [held.feed(p) for p in pieces] == out


def _calls(call_id: str, arguments: str) -> dict[str, Any]:
    return {
        "role": "assistant",
        "tool_calls": [{"id": call_id, "function": {"name": "f", "arguments": arguments}}],
    }


def test_messages_compare_canonically() -> None:
    call = _calls("c", '{"a": 1, "b": 2}')
    assert canonical({**call, "content": None}) == canonical({**_calls("c", '{"b":2,"a":1}'), "content": ""})
    assert canonical(call) != canonical(_calls("d", '{"a": 1, "b": 2}'))
    assert canonical(call) != canonical(_calls("c", '{"a": 1}'))
    parts = [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}]
    assert canonical({"role": "user", "content": parts}) == canonical(_user("x\ny"))
    assert canonical(_user("x")) != canonical({"role": "user", "content": "x", "name": "n"})
    assert canonical(_user("x")) != canonical({"role": "system", "content": "x"})
    assert digests([_user("x")], [])[1] != digests([_user("x")], [WEATHER])[1]


@pytest.mark.parametrize(
    ("messages", "extra", "match"),
    [
        ([{"role": "wizard", "content": "hi"}], {}, "role"),
        ([_user("hi")], {"n": 2}, "n must be 1"),
        ([_user("hi")], {"logprobs": True}, "logprobs"),
        ([_user("hi")], {"presence_penalty": 0.5}, "penalties"),
        ([_user("hi")], {"response_format": {"type": "json_object"}}, "text response format"),
        ([_user("hi"), {"role": "assistant", "content": "yes"}], {}, "nothing to reply to"),
        ([], {}, "non-empty"),
        ([_user("hi")], {"best_of": 3}, "unsupported parameters: best_of"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], {}, "content"),
    ],
)
def test_what_cannot_be_honoured_is_an_openai_bad_request(
    client: openai.OpenAI, model: str, messages: list[Any], extra: dict[str, Any], match: str
) -> None:
    with pytest.raises(openai.BadRequestError, match=match) as caught:
        client.chat.completions.create(model=model, messages=messages, extra_body=extra, **GREEDY)
    assert caught.value.status_code == 400
    assert caught.value.type == "invalid_request_error"


def test_a_stop_string_cuts_the_reply(client: openai.OpenAI, model: str) -> None:
    messages = [_user("count to ten")]
    full = _ask(client, model, messages, "stops-1", max_tokens=12).choices[0].message.content
    assert full is not None and len(full) > 4
    stop = full[len(full) // 2 :][:3]
    cut = _ask(client, model, messages, "stops-2", max_tokens=12, stop=[stop]).choices[0]
    assert cut.message.content == full[: full.index(stop)]


def test_messages_are_cleaned_of_what_openai_clients_echo() -> None:
    call = {"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    echoed = {"role": "assistant", "content": None, "refusal": None, "audio": None, "annotations": []}
    body = {
        "messages": [
            {"role": "developer", "content": "rules"},
            _user("go"),
            {**echoed, "function_call": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "done"},
            {**echoed, "content": "", "tool_calls": None},
            _user("again"),
        ],
        "max_tokens": 5,
        "max_completion_tokens": 5,
    }
    chat = parse(body, "m")
    assert chat.messages[0] == {"role": "system", "content": "rules"}
    assert chat.messages[2] == {
        "role": "assistant",
        "tool_calls": [{k: v for k, v in call.items() if k != "index"}],
    }
    assert chat.messages[4] == {"role": "assistant", "content": None}  # an empty reply, as sessions store it
    assert chat.options == {"temperature": 1.0, "max_tokens": 5} and chat.session_id is None
    for bad in (
        {"max_tokens": 4},
        {"messages": [{**echoed, "refusal": "I can't"}, _user("x")]},
        {"session_id": "other"},
        {"stream_options": {"include_usage": "yes"}},
    ):
        with pytest.raises(InvalidInput):
            parse({**body, **bad}, "m", "mine")


def test_harmless_parameters_are_accepted(client: openai.OpenAI, model: str) -> None:
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "developer", "content": "be brief"}, _user("hi")],
        n=1,
        user="someone",
        metadata={"k": "v"},
        store=False,
        parallel_tool_calls=True,
        presence_penalty=0,
        max_completion_tokens=3,
        temperature=0,
        seed=7,
    )
    assert r.usage is not None and r.usage.completion_tokens <= 3
    assert r.choices[0].message.role == "assistant"


def test_a_named_session_is_created_then_continued(
    client: openai.OpenAI, model: str, cluster: Cluster
) -> None:
    messages: list[Any] = [_user("hello there")]
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=messages, extra_headers={"X-Session-ID": "my-chat-1"}, **GREEDY
    )
    first = raw.parse()
    assert raw.headers["x-session-id"] == first.session_id == "my-chat-1"
    messages += [{"role": "assistant", "content": first.choices[0].message.content}, _user("go on")]
    second = _ask(client, model, messages, "default", extra_body={"session_id": "my-chat-1"})
    assert second.session_id == "my-chat-1" and second.usage.prompt_tokens_details.cached_tokens > 0
    assert len(cluster.resume("my-chat-1").messages) == 4


def test_concurrent_requests_of_one_history_never_share_a_step(
    url: str, model: str, cluster: Cluster
) -> None:
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
    history, r = _converse(client, model, ["start here"], "busy")
    request = [*history, _user("same next question")]

    async def main() -> list[Any]:
        aclient = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0)
        out: list[Any] = [None, None]

        async def one(i: int) -> None:
            out[i] = await aclient.chat.completions.create(
                model=model, messages=request, extra_body={"tenant": "busy"}, **GREEDY
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(one, 0)
            tg.start_soon(one, 1)
        return out

    a, b = anyio.run(main)
    assert a.session_id != b.session_id and r.session_id in (a.session_id, b.session_id)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert len(cluster.resume(r.session_id, "busy").messages) == 4  # stepped once, by one of them


def test_tenants_are_isolated_by_their_keys(keyed_url: str, model: str, cluster: Cluster) -> None:
    a = openai.OpenAI(base_url=keyed_url, api_key=KEY_A, max_retries=0)
    b = openai.OpenAI(base_url=keyed_url, api_key=KEY_B, max_retries=0)
    history, first = _converse(a, model, ["a secret of tenant a", "and another one"], None)
    sid = first.session_id
    before = cluster.resume(sid, "a")
    assert first.usage.prompt_tokens_details.cached_tokens > 0

    request = [*history, _user("what did I say?")]
    theirs = b.chat.completions.create(model=model, messages=request, **GREEDY)
    assert theirs.session_id != sid
    assert theirs.usage.prompt_tokens_details.cached_tokens == 0
    with pytest.raises(openai.NotFoundError):
        b.chat.completions.create(model=model, messages=request, extra_body={"session_id": sid}, **GREEDY)
    with pytest.raises(openai.PermissionDeniedError):
        b.chat.completions.create(model=model, messages=request, extra_body={"tenant": "a"}, **GREEDY)
    after = cluster.resume(sid, "a")
    assert (after.version, after.messages) == (before.version, before.messages)

    mine = a.chat.completions.create(model=model, messages=request, extra_body={"session_id": sid}, **GREEDY)
    assert mine.session_id == sid and mine.usage.prompt_tokens_details.cached_tokens > 0

    stranger = openai.OpenAI(base_url=keyed_url, api_key="wrong-key-000000000000", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.chat.completions.create(model=model, messages=request, **GREEDY)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()
    keyless = httpx.post(f"{keyed_url}/chat/completions", json={"model": model, "messages": request})
    assert keyless.status_code == 401 and keyless.json()["error"]["type"] == "authentication_error"
