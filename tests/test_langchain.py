"""ChatDualPath (integrations/langchain_dualpath): LangChain's standard chat model suites on the
default model, and our own tests of whole histories mapped onto sessions on the tiny model.

The tiny model is a random Llama with the real chat template: its replies are gibberish but
deterministic under greedy decoding, so a reply can be compared with another one's. It never
writes a well-formed tool call, not even after a forced opening, so the tool loop runs on the
default model (SmolLM2-135M-Instruct), with the call forced by tool_choice.

Standard tests the default model fails for what a 135M model can do (not for the adapter) are
xfailed with the reason, as langchain-tests documents (`@pytest.mark.xfail(reason=...)` on the
override); see XFAILED below.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.tools import tool
from langchain_dualpath import ChatDualPath, to_messages
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

import dualpath_sdk as dp
from dualpath_sdk.api.remote import RemoteCluster
from dualpath_sdk.config import EngineConfig
from dualpath_sdk.gateway import create_app
from dualpath_sdk.gateway.serve import in_thread
from tests.conftest import Pair

Clusterish = dp.Cluster | RemoteCluster
TINY: dict[str, Any] = {"temperature": 0, "max_tokens": 6}


# ---- clusters -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_cluster(chat_pair: Pair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dp.Cluster]:
    engine = EngineConfig(block_size=16, num_blocks=256)
    with dp.Cluster.local(chat_pair.path, storage=tmp_path_factory.mktemp("store"), engine=engine) as c:
        yield c


@pytest.fixture(scope="module")
def tiny_remote(tiny_cluster: dp.Cluster) -> Iterator[RemoteCluster]:
    with in_thread(create_app(tiny_cluster)) as url, dp.Cluster.connect(url) as remote:
        yield remote


@pytest.fixture(params=["local", "remote"])
def cluster(request: pytest.FixtureRequest) -> Clusterish:
    """The tiny model's cluster, embedded or behind the gateway (the same engines)."""
    name = "tiny_cluster" if request.param == "local" else "tiny_remote"
    return request.getfixturevalue(name)


@pytest.fixture(scope="module")
def default_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dp.Cluster]:
    """The default model (SmolLM2-135M-Instruct), loaded once for this module."""
    with dp.Cluster.local(storage=tmp_path_factory.mktemp("default-store")) as c:
        yield c


@pytest.fixture(scope="module")
def default_remote(default_cluster: dp.Cluster) -> Iterator[RemoteCluster]:
    with in_thread(create_app(default_cluster)) as url, dp.Cluster.connect(url) as remote:
        yield remote


def _tenant(request: pytest.FixtureRequest) -> str:
    """A tenant of the test's own (both clusters share the engines and the store)."""
    name = request.node.name.removeprefix("test_").replace("[", "-").replace("]", "")
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)[-48:].lstrip("-_.")


def _cache_read(message: BaseMessage) -> int:
    usage = message.usage_metadata  # type: ignore[attr-defined]
    assert usage is not None
    return int(usage["input_token_details"]["cache_read"])


def _sum(chunks: list[AIMessageChunk]) -> AIMessageChunk:
    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    return full


# ---- the standard suites (default model) ----------------------------------------------------------

_LAZY_URL = "http://127.0.0.1:9"  # connected at the first call: never, in the unit tests


class _Capabilities:
    """What both standard suites are told ChatDualPath does."""

    @property
    def chat_model_class(self) -> type[ChatDualPath]:
        return ChatDualPath

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return False


class TestChatDualPathStandardUnit(_Capabilities, ChatModelUnitTests):
    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"base_url": _LAZY_URL}

    @property
    def init_from_env_params(self) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
        env = {"DUALPATH_BASE_URL": "http://gateway:8000", "DUALPATH_API_KEY": "key-from-env"}
        return env, {}, {"base_url": "http://gateway:8000", "api_key": "key-from-env"}


STANDARD_MAX_TOKENS = 64  # the suite's own default (100) only makes a 135M model ramble longer

# What SmolLM2-135M-Instruct cannot do (greedy, so the same every run): given a tool's schema it
# echoes the schema (`{"input": {"type": "integer", ...}}`) or loops ("a cat is a cat, ...") where
# a value belongs, and it does not choose a tool unforced. The adapter's side of each is tested on
# the tiny model and in the tool loop below.
_ECHOES = "the 135M model writes the forced call's arguments as the schema echoed, not as values"
XFAILED = {
    "test_tool_calling": _ECHOES + " (not {'input': 3})",
    "test_tool_calling_async": _ECHOES + " (not {'input': 3})",
    "test_tool_choice": _ECHOES + ", never closing the call within max_tokens",
    "test_tool_calling_with_no_arguments": "the 135M model writes arguments for a tool that takes none, "
    "never closing the call within max_tokens",
    "test_unicode_tool_call_integration": _ECHOES + ", never closing the call within max_tokens",
    "test_structured_output": "the 135M model loops in the forced Joke call's arguments "
    "('a cat is a cat, ...') and never closes it: no call, so no parsed output",
    "test_structured_output_async": "as test_structured_output: no closed call, no parsed output",
    "test_structured_output_pydantic_2_v1": "as test_structured_output: no closed call, no parsed output",
    "test_structured_output_optional_param": "as test_structured_output: no closed call, no parsed output",
    "test_agent_loop": "unforced (tool_choice auto), the 135M model answers in text, calling no tool",
}
# Run by default (the rest of the suite is marked slow: all of it takes ~3 min here).
FAST_STANDARD = frozenset(
    {
        "test_no_overrides_DO_NOT_OVERRIDE",
        "test_invoke",
        "test_ainvoke",
        "test_stream",
        "test_astream",
        "test_stream_events_v3",
        "test_astream_events_v3",
        "test_batch",
        "test_abatch",
        "test_conversation",
        "test_double_messages_conversation",
        "test_usage_metadata",
        "test_usage_metadata_streaming",
        "test_stop_sequence",
        "test_tool_message_histories_string_content",
        "test_message_with_name",
    }
)
_MODELS = pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
_SCHEMAS = pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])


def _xfail(name: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(reason=XFAILED[name])


class TestChatDualPathStandardIntegration(_Capabilities, ChatModelIntegrationTests):
    slow_except = FAST_STANDARD  # tests/conftest.py marks the others slow
    _cluster: dp.Cluster | None = None

    @pytest.fixture(autouse=True, scope="class")
    @classmethod
    def _default_model(cls, default_cluster: dp.Cluster) -> Iterator[None]:
        cls._cluster = default_cluster
        yield
        cls._cluster = None

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"cluster": self._cluster, "tenant": "standard", "max_tokens": STANDARD_MAX_TOKENS}

    @property
    def supports_model_override(self) -> bool:
        return False  # a cluster serves one model

    @property
    def supported_usage_metadata_details(self) -> dict[Any, list[Any]]:
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}

    def invoke_with_cache_read_input(self, *, stream: bool = False) -> AIMessage:
        """The same long history twice: the second call reads its KV from the cache."""
        llm = self.chat_model_class(**{**self.chat_model_params, "max_tokens": 8})
        history: list[BaseMessage] = [
            SystemMessage("You are a careful assistant. " * 20),
            HumanMessage("Summarize the rules of chess in one sentence. " * 5),
        ]
        llm.invoke(history)
        if not stream:
            return llm.invoke(history)
        full = _sum(list(llm.stream(history)))
        return AIMessage(
            content=full.content,
            usage_metadata=full.usage_metadata,
            response_metadata=full.response_metadata,
        )

    # ---- the xfails (XFAILED): the standard tests, run as they are -------------------------------

    @_MODELS
    @_xfail("test_tool_calling")
    def test_tool_calling(self, model: BaseChatModel) -> None:
        super().test_tool_calling(model)

    @_xfail("test_tool_calling_async")
    async def test_tool_calling_async(self, model: BaseChatModel) -> None:
        await super().test_tool_calling_async(model)

    @_xfail("test_tool_choice")
    def test_tool_choice(self, model: BaseChatModel) -> None:
        super().test_tool_choice(model)

    @_xfail("test_tool_calling_with_no_arguments")
    def test_tool_calling_with_no_arguments(self, model: BaseChatModel) -> None:
        super().test_tool_calling_with_no_arguments(model)

    @_xfail("test_unicode_tool_call_integration")
    def test_unicode_tool_call_integration(
        self, model: BaseChatModel, *, tool_choice: str | None = None, force_tool_call: bool = True
    ) -> None:
        super().test_unicode_tool_call_integration(
            model, tool_choice=tool_choice, force_tool_call=force_tool_call
        )

    @_SCHEMAS
    @_xfail("test_structured_output")
    def test_structured_output(self, model: BaseChatModel, schema_type: Any) -> None:
        super().test_structured_output(model, schema_type)

    @_SCHEMAS
    @_xfail("test_structured_output_async")
    async def test_structured_output_async(self, model: BaseChatModel, schema_type: Any) -> None:
        await super().test_structured_output_async(model, schema_type)

    @_xfail("test_structured_output_pydantic_2_v1")
    def test_structured_output_pydantic_2_v1(self, model: BaseChatModel) -> None:
        super().test_structured_output_pydantic_2_v1(model)

    @_xfail("test_structured_output_optional_param")
    def test_structured_output_optional_param(self, model: BaseChatModel) -> None:
        super().test_structured_output_optional_param(model)

    @_MODELS
    @_xfail("test_agent_loop")
    def test_agent_loop(self, model: BaseChatModel) -> None:
        super().test_agent_loop(model)


# ---- our own tests (tiny model) --------------------------------------------------------------------


def test_messages_convert_to_the_sdk_shapes() -> None:
    call = {"name": "add", "args": {"a": 1, "b": "二"}, "id": "call_7", "type": "tool_call"}
    messages = [
        SystemMessage("be brief"),
        HumanMessage("add them", name="ann"),
        AIMessage(
            [{"type": "text", "text": "sure"}, {"type": "tool_use", "id": "call_7"}], tool_calls=[call]
        ),
        ToolMessage("3", tool_call_id="call_7", name="add"),
        AIMessage(""),
    ]
    assert to_messages(messages) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "add them", "name": "ann"},
        {
            "role": "assistant",
            "content": "sure",
            "tool_calls": [
                {
                    "id": "call_7",
                    "type": "function",
                    "function": {
                        "name": "add",
                        "arguments": json.dumps({"a": 1, "b": "二"}, ensure_ascii=False),
                    },
                }
            ],
        },
        {"role": "tool", "content": "3", "tool_call_id": "call_7"},
        {"role": "assistant", "content": None},
    ]
    with pytest.raises(dp.InvalidInput, match="text only"):
        to_messages([HumanMessage([{"type": "image", "url": "https://example.org/x.png"}])])


def test_a_conversation_resent_whole_continues_one_session(
    cluster: Clusterish, request: pytest.FixtureRequest
) -> None:
    tenant = _tenant(request)
    llm = ChatDualPath(cluster=cluster, tenant=tenant, **TINY)
    history: list[BaseMessage] = [SystemMessage("You are terse.")]
    cached, inputs, outputs, sessions = [], [], [], set()
    for turn in range(4):
        history.append(HumanMessage(f"question number {turn}: what comes next?"))
        reply = llm.invoke(history)
        assert reply.usage_metadata is not None
        cached.append(_cache_read(reply))
        inputs.append(reply.usage_metadata["input_tokens"])
        outputs.append(reply.usage_metadata["output_tokens"])
        sessions.add(reply.response_metadata["session_id"])
        assert reply.response_metadata["model_name"] == llm._known_model_name()
        assert reply.response_metadata["read_plan"] in ("none", "pe", "de", "split")
        history.append(reply)
    assert len(sessions) == 1, "every call continues the one session"
    assert cached[0] == 0
    for k in range(1, 4):  # the whole previous turn is read from the cache, but its last token's KV
        assert cached[k] == inputs[k - 1] + outputs[k - 1] - 1, (cached, inputs, outputs)
        assert cached[k] > cached[k - 1]
    (sid,) = sessions
    session = cluster.resume(sid, tenant)
    assert [m.get("content") or "" for m in session.messages] == [m.text for m in history]


def test_streams_and_async_calls_continue_the_session(
    cluster: Clusterish, request: pytest.FixtureRequest
) -> None:
    tenant = _tenant(request)
    llm = ChatDualPath(cluster=cluster, tenant=tenant, **TINY)
    question = [HumanMessage("tell me a story about a lighthouse")]
    reference = ChatDualPath(cluster=cluster, tenant=tenant + "-ref", **TINY).invoke(question)

    chunks = list(llm.stream(question))
    full = _sum(chunks)
    assert full.text == reference.text and full.text
    assert chunks[-1].chunk_position == "last" and chunks[-1].usage_metadata is not None
    assert [c for c in chunks if c.usage_metadata] == [chunks[-1]], "usage once, on the last chunk"
    assert _cache_read(chunks[-1]) == 0
    sid = full.response_metadata["session_id"]
    history: list[BaseMessage] = [*question, AIMessage(full.text), HumanMessage("and then?")]

    async def main() -> tuple[AIMessageChunk, AIMessage]:
        achunks = [c async for c in llm.astream(history)]
        streamed = _sum(achunks)
        assert achunks[-1].chunk_position == "last"
        more = [*history, AIMessage(streamed.text), HumanMessage("and after that?")]
        return streamed, await llm.ainvoke(more)

    streamed, last = anyio.run(main)
    assert streamed.response_metadata["session_id"] == sid == last.response_metadata["session_id"]
    assert full.usage_metadata is not None
    assert (
        _cache_read(streamed)
        == full.usage_metadata["input_tokens"] + full.usage_metadata["output_tokens"] - 1
    )
    assert _cache_read(last) > _cache_read(streamed)

    # batch: two conversations at once (threads, each its own session)
    a, b = llm.batch([[HumanMessage("first of two")], [HumanMessage("second of two")]])
    assert a.response_metadata["session_id"] != b.response_metadata["session_id"]


def test_an_edited_message_forks_and_the_original_is_unchanged(
    cluster: Clusterish, request: pytest.FixtureRequest
) -> None:
    tenant = _tenant(request)
    llm = ChatDualPath(cluster=cluster, tenant=tenant, **TINY)
    history: list[BaseMessage] = []
    for text in ["first question", "second question", "third question"]:
        history.append(HumanMessage(text))
        history.append(llm.invoke(history))
    original = history[-1].response_metadata["session_id"]
    before = cluster.resume(original, tenant)

    edited = [*history[:2], HumanMessage("an edited second question")]
    forked = llm.invoke(edited)
    assert forked.response_metadata["session_id"] != original
    assert _cache_read(forked) > 0  # the first turn's KV, from the fork

    fresh_llm = ChatDualPath(cluster=cluster, tenant=tenant + "-fresh", **TINY)
    fresh: list[BaseMessage] = []  # the edited conversation from scratch, in a tenant of its own
    for message in edited:
        if isinstance(message, HumanMessage):
            fresh.append(message)
            fresh.append(fresh_llm.invoke(fresh))
    assert [m.text for m in fresh[:3]] == [m.text for m in edited], "greedy: the same first reply"
    assert forked.text == fresh[-1].text

    after = cluster.resume(original, tenant)
    assert (after.messages, after.version) == (before.messages, before.version)
    cont = llm.invoke([*history, HumanMessage("fourth question")])
    assert cont.response_metadata["session_id"] == original
    assert _cache_read(cont) == len(before.token_ids) - 1


def test_a_session_named_in_the_config_or_the_model_holds_the_conversation(
    cluster: Clusterish, request: pytest.FixtureRequest
) -> None:
    tenant = _tenant(request)
    sid = f"chat-{tenant}"[:100]
    llm = ChatDualPath(cluster=cluster, tenant=tenant, **TINY)
    history: list[BaseMessage] = [HumanMessage("hello there")]
    reply = llm.invoke(history, config={"configurable": {"session_id": sid}})
    assert reply.response_metadata["session_id"] == sid
    history += [reply, HumanMessage("and you?")]
    again = ChatDualPath(cluster=cluster, tenant=tenant, session_id=sid, **TINY).invoke(history)
    assert again.response_metadata["session_id"] == sid and _cache_read(again) > 0
    assert len(cluster.resume(sid, tenant).messages) == 4


def test_the_same_history_twice_reads_it_from_the_cache(
    cluster: Clusterish, request: pytest.FixtureRequest
) -> None:
    """What the standard suite's cache-read hook relies on: blocks are shared within a tenant."""
    llm = ChatDualPath(cluster=cluster, tenant=_tenant(request), **TINY)
    history = [SystemMessage("You are a careful assistant. " * 10), HumanMessage("Summarize chess. " * 5)]
    first, second = llm.invoke(history), llm.invoke(history)
    assert _cache_read(first) == 0
    assert second.usage_metadata is not None
    assert 0 < _cache_read(second) <= second.usage_metadata["input_tokens"]


def test_a_forced_tool_choice_opens_a_call_the_tiny_model_cannot_finish(
    tiny_cluster: dp.Cluster, request: pytest.FixtureRequest
) -> None:
    """The forced opening is the reply's start; what the random model writes after it is no JSON,
    so the reply is text (the default model's tool loop below gets a call)."""

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return "sunny"

    tenant = _tenant(request)
    llm = ChatDualPath(cluster=tiny_cluster, tenant=tenant, **TINY).bind_tools(
        [get_weather], tool_choice="any"
    )
    reply = llm.invoke("weather in Rome?")
    assert isinstance(reply, AIMessage) and not reply.tool_calls
    assert reply.text.startswith('<tool_call>\n{"name": "get_weather", "arguments":')
    chunks = list(llm.stream("weather in Oslo?"))
    assert _sum(chunks).text.startswith('<tool_call>\n{"name": "get_weather"')


@pytest.mark.parametrize("kind", ["local", "remote"])
def test_a_tool_loop_continues_the_session_with_the_tool_result(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """A local tool called in a loop, on the default model: the call is forced with tool_choice
    (a 135M model does not choose a tool itself); the ToolMessage continues the same session."""
    cluster = request.getfixturevalue("default_cluster" if kind == "local" else "default_remote")
    calls: list[str] = []

    @tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        calls.append(city)
        return f"It is sunny and 21 degrees in {city}."

    tenant = _tenant(request)
    llm = ChatDualPath(cluster=cluster, tenant=tenant, max_tokens=32)
    forced = llm.bind_tools([get_weather], tool_choice="get_weather")
    example = {"name": "get_weather", "args": {"city": "Berlin"}, "id": "call_1", "type": "tool_call"}
    history: list[BaseMessage] = [  # one worked example: unprompted, it echoes the schema as arguments
        HumanMessage("What is the weather in Berlin?"),
        AIMessage("", tool_calls=[example]),
        ToolMessage("It is rainy and 12 degrees in Berlin.", tool_call_id="call_1"),
        AIMessage("It is rainy in Berlin."),
        HumanMessage("What is the weather in Paris?"),
    ]
    call = forced.invoke(history)
    assert isinstance(call, AIMessage) and call.tool_calls, call
    assert call.tool_calls[0] == {**call.tool_calls[0], "name": "get_weather", "args": {"city": "Paris"}}
    assert call.response_metadata["finish_reason"] == "tool_calls"
    history += [call, get_weather.invoke(call.tool_calls[0])]
    assert isinstance(history[-1], ToolMessage) and calls == ["Paris"]

    answer = llm.bind_tools([get_weather]).invoke(history)  # the same tools: the same session's KV
    assert answer.response_metadata["session_id"] == call.response_metadata["session_id"]
    assert call.usage_metadata is not None
    assert (
        _cache_read(answer) == call.usage_metadata["input_tokens"] + call.usage_metadata["output_tokens"] - 1
    )

    # streamed, the call comes as tool_call_chunks (never as markup) and assembles to the call
    chunks = list(forced.stream(history[:5]))
    full = _sum(chunks)
    assert full.tool_call_chunks and full.tool_calls[0]["args"] == {"city": "Paris"}
    assert "<tool_call>" not in full.text and chunks[-1].chunk_position == "last"


def test_ls_params_and_a_model_without_a_cluster() -> None:
    assert issubclass(ChatDualPath, BaseChatModel)
    llm = ChatDualPath(base_url=_LAZY_URL, model="m", stop=["x"], max_tokens=5)
    params = llm._get_ls_params()
    assert (params["ls_model_name"], params["ls_stop"], params["ls_max_tokens"]) == ("m", ["x"], 5)
    with pytest.raises(dp.InvalidInput, match="needs cluster"):
        ChatDualPath().invoke("hi")
