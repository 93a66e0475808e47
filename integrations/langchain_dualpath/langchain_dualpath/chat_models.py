"""ChatDualPath: a LangChain chat model whose conversations are dualpath-sdk sessions.

LangChain sends the whole history on every call. `dualpath_sdk.api.history.History` maps it onto
one of the tenant's sessions (the one `config["configurable"]["session_id"]` or the model's
`session_id` names, else the one holding the longest prefix), so only the messages it does not hold
yet are prefilled and the rest is read from the KV-Cache; an edited earlier message forks the
session at its latest mark before the edit, leaving the original as it was. Every reply carries
`usage_metadata` (with `input_token_details.cache_read`: the prompt tokens whose KV was loaded, not
computed) and `response_metadata` naming the model, the session, the read plan, the bytes read on
each side and the time to first token.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.language_models.chat_models import agenerate_from_stream, generate_from_stream
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import InputTokenDetails, UsageMetadata
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig, ensure_config
from langchain_core.tools import BaseTool
from langchain_core.utils import from_env, secret_from_env
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, Field, PrivateAttr, SecretStr

from dualpath_sdk.api.cluster import Cluster
from dualpath_sdk.api.history import AsyncStepEvents, History, StepEvents
from dualpath_sdk.api.remote import RemoteCluster
from dualpath_sdk.api.result import StepChunk, StepResult
from dualpath_sdk.api.session import Session
from dualpath_sdk.errors import DualPathError, EngineUnavailable, InvalidInput, QueueFull
from dualpath_sdk.model.tools import HeldText

# Keywords a call may pass on to the step (besides tools and tool_choice, which bind_tools sets).
_STEP_OPTIONS = {"max_tokens", "temperature", "top_p", "seed", "stop", "ignore_eos", "read_plan"}
_OWN = {"tools", "tool_choice", "session_id", "model", "stream"}
_ROLES = {"system": "system", "developer": "system", "user": "user", "human": "user"}
_ROLES |= {"assistant": "assistant", "ai": "assistant"}  # a generic ChatMessage's role, as ours
_RETRIED = (QueueFull, EngineUnavailable)  # a step that failed so before it started left no trace


class _Served:
    """What every ChatDualPath on one cluster shares: its History (so one conversation is found
    whichever model object sends it) and the served model's name."""

    def __init__(self, cluster: Cluster | RemoteCluster) -> None:
        self.history = History(cluster)
        self.model_name = _model_name(cluster)


_SERVED_ATTR = "_langchain_dualpath"  # on the cluster: it lives (and is collected) with it
_SERVED_LOCK = threading.Lock()


def _served(cluster: Cluster | RemoteCluster) -> _Served:
    with _SERVED_LOCK:
        served: _Served | None = getattr(cluster, _SERVED_ATTR, None)
        if served is None:
            served = _Served(cluster)
            setattr(cluster, _SERVED_ATTR, served)
        return served


def _model_name(cluster: Cluster | RemoteCluster) -> str:
    """The served model's id (a gateway's, as its `GET /v1/models` gives it)."""
    try:
        return cluster.model_id
    except DualPathError:  # no gateway reachable yet: the step will say so
        return "dualpath"


class ChatDualPath(BaseChatModel):
    """A chat model served by a dualpath-sdk cluster: `cluster=dp.Cluster.local(...)` (embedded
    engines) or `dp.Cluster.connect(url)`, or `base_url=` (connected at the first call; `api_key`
    and `timeout` go to `Cluster.connect`).

    ```python
    import dualpath_sdk as dp
    from langchain_dualpath import ChatDualPath

    with dp.Cluster.local() as cluster:
        llm = ChatDualPath(cluster=cluster, max_tokens=64)
        history = [("human", "Hello!")]
        reply = llm.invoke(history)  # a new session
        history += [reply, ("human", "And then?")]
        reply = llm.invoke(history)  # the same session: only the new messages are prefilled
        reply.usage_metadata["input_token_details"]["cache_read"]  # > 0
    ```

    Tools bind as usual (`bind_tools`, with `tool_choice` "auto", "none", "any"/"required", a tool's
    name or an OpenAI named choice); a forced choice makes the reply begin with the call's markup
    and the model writes the rest (a call it leaves malformed or unclosed is returned as text).
    With `tool_choice="any"` and a single tool, the call names that tool (the same constraint, and
    the model need not write the name). `with_structured_output` works through a forced tool call
    (whatever `method` asks: the engine has no JSON mode).

    Text content only: images, audio and files are refused (InvalidInput), as are call keywords
    the engine cannot honour.
    """

    cluster: Any = Field(default=None, exclude=True)
    """A `dp.Cluster.local(...)` or `dp.Cluster.connect(...)`; None: connect to `base_url`."""
    base_url: str | None = Field(default_factory=from_env("DUALPATH_BASE_URL", default=None))
    """A gateway (`dualpath serve`) to connect to at the first call, when `cluster` is None."""
    api_key: SecretStr | None = Field(default_factory=secret_from_env("DUALPATH_API_KEY", default=None))
    """The gateway key (it names the tenant) for `base_url`."""
    timeout: float | None = None
    """For `base_url`: the longest wait for a step's next event, in seconds (default 600)."""
    max_retries: int = Field(default=0, ge=0)
    """Retries of a step refused before it started (a full queue, an engine down): it left no trace."""
    model_name: str | None = Field(default=None, alias="model")
    """The served model's id (default: the cluster's); a call naming another is refused."""
    session_id: str | None = None
    """The session conversations continue (or are created as) unless a call's config names one."""
    tenant: str | None = None
    """The tenant whose sessions hold the conversations; None: a local cluster's "default", a
    gateway's API key's."""
    max_tokens: int | None = Field(default=None, ge=1)
    """The longest reply in tokens (None: the SDK's default, 128)."""
    temperature: float = 0.0
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    """Strings that end the reply (not included in it)."""
    streaming: bool = False
    """Whether `invoke` streams underneath (callbacks see tokens as they come)."""

    model_config = ConfigDict(populate_by_name=True)

    _remote: RemoteCluster | None = PrivateAttr(default=None)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    # ---- what LangChain asks of a chat model ----------------------------------------------------

    @property
    def _llm_type(self) -> str:
        return "dualpath"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self._known_model_name(),
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": self.stop,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        model = kwargs.get("model")
        params = LangSmithParams(
            ls_provider="dualpath",
            ls_model_name=model if isinstance(model, str) else self._known_model_name(),
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
        )
        if (max_tokens := kwargs.get("max_tokens", self.max_tokens)) is not None:
            params["ls_max_tokens"] = max_tokens
        if stops := stop or self.stop:
            params["ls_stop"] = stops
        return params

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: dict[str, Any] | str | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """The model with `tools` (anything `convert_to_openai_tool` takes) on every call.

        `tool_choice`: "auto" (default) or "none"; "any", "required" or True: the reply must call
        a tool (the only one, named, when there is one); a tool's name, `{"type": "function",
        "function": {"name": ...}}` or `{"name": ...}`: the reply calls that tool."""
        schemas = [_openai_tool(t) for t in tools]
        if tool_choice is not None and tool_choice is not False:
            kwargs["tool_choice"] = _tool_choice(tool_choice, schemas)
        elif tool_choice is False:
            kwargs["tool_choice"] = "none"
        return super().bind(tools=schemas, **kwargs)

    # ---- the session id a call's config names ---------------------------------------------------

    def invoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        return super().invoke(input, config, stop=stop, **_configured(config, kwargs))

    async def ainvoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        return await super().ainvoke(input, config, stop=stop, **_configured(config, kwargs))

    def stream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> Iterator[AIMessageChunk]:
        yield from super().stream(input, config, stop=stop, **_configured(config, kwargs))

    async def astream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[AIMessageChunk]:
        async for chunk in super().astream(input, config, stop=stop, **_configured(config, kwargs)):
            yield chunk

    # ---- the steps --------------------------------------------------------------------------------

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.streaming:
            return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))
        session, events, served = self._start(messages, stop, kwargs)
        with events:
            result = _result(events)
        return ChatResult(generations=[ChatGeneration(message=_message(result, session, served))])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.streaming:
            return await agenerate_from_stream(self._astream(messages, stop, run_manager, **kwargs))
        session, events, served = await self._astart(messages, stop, kwargs)
        async with events:
            result = None
            async for item in events:
                result = item
        assert isinstance(result, StepResult)
        return ChatResult(generations=[ChatGeneration(message=_message(result, session, served))])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        session, events, served = self._start(messages, stop, kwargs)
        held = HeldText(bool(kwargs.get("tools")) and kwargs.get("tool_choice") != "none")
        with events:
            for item in events:
                chunk = _chunk(item, held, session, served)
                if chunk is None:
                    continue
                if run_manager:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        session, events, served = await self._astart(messages, stop, kwargs)
        held = HeldText(bool(kwargs.get("tools")) and kwargs.get("tool_choice") != "none")
        async with events:
            async for item in events:
                chunk = _chunk(item, held, session, served)
                if chunk is None:
                    continue
                if run_manager:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk

    def _start(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[Session, StepEvents, _Served]:
        served = _served(self._cluster())
        request, session_id, options = self._request(messages, stop, kwargs, served)
        for attempt in range(self.max_retries + 1):
            try:
                session, events = served.history.step(
                    request, tenant=self.tenant, session_id=session_id, **options
                )
                return session, events, served
            except _RETRIED:
                if attempt == self.max_retries:
                    raise
                time.sleep(min(0.25 * 2**attempt, 4.0))
        raise AssertionError("unreachable")

    async def _astart(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[Session, AsyncStepEvents, _Served]:
        served = _served(self._cluster())
        request, session_id, options = self._request(messages, stop, kwargs, served)
        for attempt in range(self.max_retries + 1):
            try:
                session, events = await served.history.astep(
                    request, tenant=self.tenant, session_id=session_id, **options
                )
                return session, events, served
            except _RETRIED:
                if attempt == self.max_retries:
                    raise
                await asyncio.sleep(min(0.25 * 2**attempt, 4.0))
        raise AssertionError("unreachable")

    def _request(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None,
        kwargs: dict[str, Any],
        served: _Served,
    ) -> tuple[list[dict[str, Any]], str | None, dict[str, Any]]:
        """(the history as our message dicts, the session id asked for, the step's options)."""
        unknown = sorted(k for k in kwargs if k not in _STEP_OPTIONS | _OWN and not k.startswith("ls_"))
        if unknown:
            raise InvalidInput(f"ChatDualPath: unsupported call arguments {', '.join(unknown)}")
        model = kwargs.get("model")
        if model is not None and model != served.model_name:
            raise InvalidInput(
                f"model {model!r} is not served here: this cluster serves {served.model_name!r}"
            )
        options: dict[str, Any] = {"temperature": self.temperature}
        for name in ("max_tokens", "top_p", "seed"):
            if getattr(self, name) is not None:
                options[name] = getattr(self, name)
        stops = stop if stop is not None else self.stop
        if stops:
            options["stop"] = list(stops)
        options.update({k: v for k, v in kwargs.items() if k in _STEP_OPTIONS and v is not None})
        if kwargs.get("tools"):
            options["tools"] = kwargs["tools"]
            if kwargs.get("tool_choice") is not None:
                options["tool_choice"] = kwargs["tool_choice"]
        session_id = kwargs.get("session_id")  # the call's config's (see `_configured`)
        if session_id is None:  # inside a LangGraph node (or any runnable): the config it runs under
            session_id = (ensure_config().get("configurable") or {}).get("session_id")
        if session_id is None:
            session_id = self.session_id
        return to_messages(messages), session_id, options

    # ---- the cluster ------------------------------------------------------------------------------

    def _cluster(self) -> Cluster | RemoteCluster:
        if self.cluster is not None:
            if not isinstance(self.cluster, (Cluster, RemoteCluster)):
                raise InvalidInput("cluster must be a dp.Cluster.local(...) or a dp.Cluster.connect(...)")
            return self.cluster
        if self.base_url is None:
            raise InvalidInput(
                "ChatDualPath needs cluster= (a Cluster.local or Cluster.connect) or base_url="
            )
        with self._lock:
            if self._remote is None:
                key = self.api_key.get_secret_value() if self.api_key is not None else None
                timeout = {} if self.timeout is None else {"timeout_s": self.timeout}
                self._remote = Cluster.connect(self.base_url, api_key=key, **timeout)
            return self._remote

    def _known_model_name(self) -> str:
        """The model's name without asking a gateway (before the first call on one: "dualpath")."""
        if self.model_name is not None:
            return self.model_name
        cluster = self.cluster if self.cluster is not None else self._remote
        if isinstance(cluster, Cluster):
            return _model_name(cluster)
        served = getattr(cluster, _SERVED_ATTR, None)
        return served.model_name if isinstance(served, _Served) else "dualpath"


# ---- LangChain messages <-> ours ----------------------------------------------------------------


def to_messages(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """LangChain messages as the SDK's (OpenAI-shaped) message dicts: system, user, assistant (its
    tool calls with JSON-string arguments) and tool (with its tool_call_id). Text only: a message
    with image, audio or file content is refused."""
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if isinstance(message, SystemMessage):
            entry: dict[str, Any] = {"role": "system", "content": _text(message, i)}
        elif isinstance(message, HumanMessage):
            entry = {"role": "user", "content": _text(message, i)}
        elif isinstance(message, AIMessage):
            entry = _assistant(message)
        elif isinstance(message, ToolMessage):
            entry = {"role": "tool", "content": _text(message, i), "tool_call_id": message.tool_call_id}
        elif isinstance(message, ChatMessage) and message.role in _ROLES:
            role, text = _ROLES[message.role], _text(message, i)
            entry = {"role": role, "content": (text or None) if role == "assistant" else text}
        else:
            raise InvalidInput(f"message {i}: a {type(message).__name__} has no role here")
        if message.name and entry["role"] != "tool":
            entry["name"] = message.name
        out.append(entry)
    return out


def _text(message: BaseMessage, i: int) -> str:
    content = message.content
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        else:
            raise InvalidInput(f"message {i}: {block.get('type')!r} content is not supported (text only)")
    return "".join(parts)


def _assistant(message: AIMessage) -> dict[str, Any]:
    """An AI message: its text (tool-use, reasoning and other non-text blocks are what its
    tool_calls and the model's own KV say) and its tool calls."""
    calls = [
        {
            "id": call.get("id") or f"call_{k}",
            "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["args"], ensure_ascii=False)},
        }
        for k, call in enumerate(message.tool_calls)
    ]
    text = message.text
    entry: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        entry["tool_calls"] = calls
    return entry


def _message(result: StepResult, session: Session, served: _Served) -> AIMessage:
    return AIMessage(
        content=result.text,
        tool_calls=[_tool_call(call) for call in result.tool_calls],
        usage_metadata=_usage(result),
        response_metadata=_metadata(result, session, served),
    )


def _tool_call(call: Mapping[str, Any]) -> dict[str, Any]:
    fn = call["function"]
    return {"name": fn["name"], "args": json.loads(fn["arguments"]), "id": call["id"], "type": "tool_call"}


def _usage(result: StepResult) -> UsageMetadata:
    usage = result.usage
    return UsageMetadata(
        input_tokens=usage.prompt_tokens,
        output_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        input_token_details=InputTokenDetails(cache_read=usage.cached_tokens),
    )


def _metadata(result: StepResult, session: Session, served: _Served) -> dict[str, Any]:
    return {
        "model_name": served.model_name,
        "model_provider": "dualpath",
        "finish_reason": result.finish_reason,
        "session_id": session.id,
        "read_plan": result.load.plan,
        "bytes_pe": result.load.bytes_pe,
        "bytes_de": result.load.bytes_de,
        "ttft_s": result.timings.ttft_s,
    }


def _chunk(
    item: StepChunk | StepResult, held: HeldText, session: Session, served: _Served
) -> ChatGenerationChunk | None:
    """A step's event as a LangChain chunk: text as it comes (what may be the start of a tool call
    is held back), then the last chunk with the rest of the text, the tool calls, usage and
    metadata (`chunk_position="last"`). None for an event that adds nothing."""
    if isinstance(item, StepChunk):
        delta = held.feed(item.text)
        return ChatGenerationChunk(message=AIMessageChunk(content=delta)) if delta else None
    calls = [
        tool_call_chunk(name=c["function"]["name"], args=c["function"]["arguments"], id=c["id"], index=i)
        for i, c in enumerate(item.tool_calls)
    ]
    message = AIMessageChunk(
        content=held.rest(item.text),
        tool_call_chunks=calls,
        usage_metadata=_usage(item),
        response_metadata=_metadata(item, session, served),
        chunk_position="last",
    )
    return ChatGenerationChunk(message=message)


def _result(events: Iterator[StepChunk | StepResult]) -> StepResult:
    result = None
    for item in events:
        result = item
    assert isinstance(result, StepResult)
    return result


def _configured(config: RunnableConfig | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's keywords with the session id its config names (`configurable.session_id`)."""
    if config and "session_id" not in kwargs:
        session_id = (config.get("configurable") or {}).get("session_id")
        if session_id is not None:
            return {**kwargs, "session_id": session_id}
    return kwargs


def _openai_tool(tool: dict[str, Any] | type | Callable[..., Any] | BaseTool) -> dict[str, Any]:
    schema = convert_to_openai_tool(tool)
    fn = {k: v for k, v in schema["function"].items() if k in ("name", "description", "parameters")}
    return {"type": "function", "function": fn}


def _tool_choice(
    choice: dict[str, Any] | str | bool, tools: list[dict[str, Any]]
) -> Literal["auto", "none", "required"] | dict[str, Any]:
    """LangChain's tool_choice as ours: "auto", "none", "required", or a named function."""
    names = [t["function"]["name"] for t in tools]
    if choice is True or choice in ("any", "required"):
        if len(names) == 1:  # the same constraint; the model need not write the name itself
            return {"type": "function", "function": {"name": names[0]}}
        return "required"
    if choice in ("auto", "none"):
        return choice
    if isinstance(choice, str):
        if choice not in names:
            raise InvalidInput(f"tool_choice {choice!r} is not one of the tools ({', '.join(names)})")
        return {"type": "function", "function": {"name": choice}}
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") or choice.get("name")
        if not isinstance(name, str):
            raise InvalidInput(f"tool_choice {choice!r} names no function")
        return _tool_choice(name, tools)
    raise InvalidInput(f"tool_choice {choice!r}: give 'auto', 'none', 'any', a tool's name or a dict")
