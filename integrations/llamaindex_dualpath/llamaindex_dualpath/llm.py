"""DualPathLLM: a LlamaIndex FunctionCallingLLM whose calls continue dualpath-sdk sessions.

LlamaIndex sends the whole conversation on every call. Each call goes through the SDK's History
(dualpath_sdk/api/history.py): to the session named by `session_id`, else to the session of the
tenant that holds the longest prefix of the conversation, stepped with only the messages it does not
hold yet (its KV-Cache is reloaded, not recomputed); an edited earlier message forks that session at
its latest mark before the edit, and the original stays as it was; anything else is a new session.

Messages map to the SDK's chat messages (text only): `TextBlock`s are the content, an assistant's
`ToolCallBlock`s (or OpenAI-shaped `additional_kwargs["tool_calls"]`) its tool calls, a tool
message's `additional_kwargs["tool_call_id"]` the call it answers. A reply's tool calls come back as
`ToolCallBlock`s with the SDK's call ids, so the reply resent as history matches what the session
holds and the next call continues it in place.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from llama_index.core.base.llms.types import (
    CachePoint,
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.constants import DEFAULT_CONTEXT_WINDOW
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.llms.utils import parse_partial_json

from dualpath_sdk.api.cluster import Cluster
from dualpath_sdk.api.history import History
from dualpath_sdk.api.remote import RemoteCluster
from dualpath_sdk.api.result import StepChunk, StepResult
from dualpath_sdk.api.session import Session
from dualpath_sdk.errors import DualPathError, EngineUnavailable
from dualpath_sdk.model.tools import HeldText

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

_ROLES = {
    MessageRole.SYSTEM: "system",
    MessageRole.DEVELOPER: "system",
    MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant",
    MessageRole.CHATBOT: "assistant",
    MessageRole.MODEL: "assistant",
    MessageRole.TOOL: "tool",
    MessageRole.FUNCTION: "tool",
}
_TOOL_CHOICE_MODES = ("auto", "none", "required")


class DualPathLLM(FunctionCallingLLM):
    """A LlamaIndex LLM on a dualpath-sdk cluster: `Cluster.local(...)` or `Cluster.connect(url)`.

    Every keyword of a call (`chat(messages, max_tokens=8)`, ...) overrides the field of that name
    for the call; other keywords are `Session.step` options (`read_plan`, `ignore_eos`, ...).
    """

    session_id: str | None = Field(
        default=None,
        description="The session every call continues (created by the first call); None: the "
        "tenant's session that holds the longest prefix of the conversation, or a new one.",
    )
    tenant: str | None = Field(
        default=None, description="The tenant whose sessions are used; None: the cluster's default."
    )
    max_tokens: int = Field(default=256, gt=0, description="Tokens to generate at most.")
    temperature: float = Field(default=0.0, ge=0.0, description="0: greedy (deterministic).")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, description="The sampling seed (temperature > 0).")
    stop: list[str] | None = Field(default=None, description="Strings that end the reply.")
    context_window: int | None = Field(
        default=None,
        description="The model's context in tokens; None: a local cluster's model's, or LlamaIndex's "
        "default for a connected cluster (a gateway does not say it).",
    )
    model: str | None = Field(default=None, description="The model's name; None: the cluster's.")
    step_options: dict[str, Any] = Field(
        default_factory=dict, description="Other `Session.step` keywords for every call."
    )

    _cluster: Cluster | RemoteCluster = PrivateAttr()
    _history: History = PrivateAttr()
    _model_name: str | None = PrivateAttr(default=None)

    def __init__(self, cluster: Cluster | RemoteCluster, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._cluster = cluster
        self._history = History(cluster)

    @classmethod
    def class_name(cls) -> str:
        return "DualPathLLM"

    @property
    def cluster(self) -> Cluster | RemoteCluster:
        return self._cluster

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self._context(),
            num_output=self.max_tokens,
            is_chat_model=True,
            is_function_calling_model=True,
            model_name=self._name(),
        )

    # ---- chat ------------------------------------------------------------------------------------

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        session, events, _ = self._step(messages, kwargs)
        try:
            result = _result(events)
        finally:
            _close(events)
        return _response(session, result)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        session, events, hold = self._step(messages, kwargs)
        held = HeldText(hold)

        def gen() -> ChatResponseGen:
            text = ""
            try:
                for item in events:
                    if isinstance(item, StepChunk):
                        if delta := held.feed(item.text):
                            text += delta
                            yield _partial(text, delta)
                    else:
                        yield _response(session, item, delta=held.rest(item.text))
                        return
            finally:
                _close(events)

        return gen()

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        session, events, _ = await self._astep(messages, kwargs)
        result = None
        try:
            async for item in events:
                if isinstance(item, StepResult):
                    result = item
        finally:
            await _aclose(events)
        if result is None:
            raise EngineUnavailable("the step ended without its result")
        return _response(session, result)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        session, events, hold = await self._astep(messages, kwargs)
        held = HeldText(hold)

        async def gen() -> ChatResponseAsyncGen:
            text = ""
            try:
                async for item in events:
                    if isinstance(item, StepChunk):
                        if delta := held.feed(item.text):
                            text += delta
                            yield _partial(text, delta)
                    else:
                        yield _response(session, item, delta=held.rest(item.text))
                        return
            finally:
                await _aclose(events)

        return gen()

    # ---- completion: a prompt is one user message ------------------------------------------------

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return _completion(self.chat([ChatMessage(role=MessageRole.USER, content=prompt)], **kwargs))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        responses = self.stream_chat([ChatMessage(role=MessageRole.USER, content=prompt)], **kwargs)
        return (_completion(r) for r in responses)

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return _completion(await self.achat([ChatMessage(role=MessageRole.USER, content=prompt)], **kwargs))

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        responses = await self.astream_chat([ChatMessage(role=MessageRole.USER, content=prompt)], **kwargs)

        async def gen() -> CompletionResponseAsyncGen:
            async for r in responses:
                yield _completion(r)

        return gen()

    # ---- tools -------------------------------------------------------------------------------------

    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The chat's arguments: the messages, the tools' OpenAI schemas, and `tool_choice`
        ("required" for `tool_required`, unless a `tool_choice` keyword says otherwise)."""
        messages = list(chat_history or [])
        if isinstance(user_msg, str):
            messages.append(ChatMessage(role=MessageRole.USER, content=user_msg))
        elif user_msg is not None:
            messages.append(user_msg)
        out: dict[str, Any] = {"messages": messages, **kwargs}
        if tools:
            out["tools"] = _schemas(tools)
        if out.get("tool_choice") is None:
            out.pop("tool_choice", None)
            if tool_required:
                out["tool_choice"] = "required"
        return out

    def _validate_chat_with_tools_response(
        self,
        response: ChatResponse,
        tools: Sequence[BaseTool],
        allow_parallel_tool_calls: bool = False,
        **kwargs: Any,
    ) -> ChatResponse:
        """Without parallel calls, only the reply's first tool call is kept (as LlamaIndex's OpenAI
        LLM does). Resent, that reply then differs from the session's, whose next call forks at the
        mark before it (the reply is recomputed, not the rest)."""
        if not allow_parallel_tool_calls:
            blocks, seen = [], False
            for block in response.message.blocks:
                if isinstance(block, ToolCallBlock):
                    if seen:
                        continue
                    seen = True
                blocks.append(block)
            response.message.blocks = blocks
        return response

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        """The reply's tool calls (its `ToolCallBlock`s, else OpenAI-shaped ones in its
        `additional_kwargs`); ValueError when it has none and `error_on_no_tool_call`."""
        selections = []
        for call in message_tool_calls(response.message):
            fn = call["function"]
            args = fn.get("arguments")
            if isinstance(args, str):
                try:
                    args = parse_partial_json(args) if args.strip() else {}
                except (ValueError, TypeError):
                    args = {}
            selections.append(
                ToolSelection(
                    tool_id=call["id"],
                    tool_name=fn["name"],
                    tool_kwargs=args if isinstance(args, dict) else {},
                )
            )
        if not selections and error_on_no_tool_call:
            raise ValueError(f"Expected at least one tool call, but got 0 tool calls: {response.message}")
        return selections

    # ---- the step ----------------------------------------------------------------------------------

    def _step(
        self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]
    ) -> tuple[Session, Iterator[StepChunk | StepResult], bool]:
        """The session stepped, the step's events, and whether its reply is read for tool calls."""
        session_id, tenant, options = self._options(kwargs)
        history = to_dualpath_messages(messages)
        session, events = self._history.step(history, tenant=tenant, session_id=session_id, **options)
        return session, events, _reads_calls(options)

    async def _astep(
        self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]
    ) -> tuple[Session, AsyncIterator[StepChunk | StepResult], bool]:
        session_id, tenant, options = self._options(kwargs)
        history = to_dualpath_messages(messages)
        session, events = await self._history.astep(history, tenant=tenant, session_id=session_id, **options)
        return session, events, _reads_calls(options)

    def _options(self, kwargs: Mapping[str, Any]) -> tuple[str | None, str | None, dict[str, Any]]:
        """(session_id, tenant, the step's options) of a call: the fields, overridden by its keywords."""
        kw = dict(kwargs)
        session_id, tenant = kw.pop("session_id", self.session_id), kw.pop("tenant", self.tenant)
        options: dict[str, Any] = {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            **({"seed": self.seed} if self.seed is not None else {}),
            **({"stop": self.stop} if self.stop else {}),
            **self.step_options,
            **kw,
        }
        if options.get("tools"):
            options["tools"] = _schemas(options["tools"])
        else:
            options.pop("tools", None)
        if options.get("tool_choice") is None:
            options.pop("tool_choice", None)
        else:
            options["tool_choice"] = tool_choice(options["tool_choice"])
        return session_id, tenant, options

    def _context(self) -> int:
        if self.context_window is not None:
            return self.context_window
        try:
            return self._cluster.max_context
        except DualPathError:  # no gateway reachable yet
            return DEFAULT_CONTEXT_WINDOW

    def _name(self) -> str:
        if self.model is not None:
            return self.model
        if self._model_name is None:
            try:
                self._model_name = self._cluster.model_id
            except DualPathError:
                return "dualpath"  # asked again next time
        return self._model_name


# ---- LlamaIndex messages <-> the SDK's -------------------------------------------------------------


def to_dualpath_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """LlamaIndex chat messages as the SDK's message dicts (text content, tool calls, call ids)."""
    return [_message(m, i) for i, m in enumerate(messages)]


def _message(message: ChatMessage, index: int) -> dict[str, Any]:
    role = _ROLES.get(message.role)
    if role is None:
        raise ValueError(f"DualPathLLM cannot send a message of role {message.role!r}")
    texts = []
    for block in message.blocks:
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif not isinstance(block, (ToolCallBlock, ThinkingBlock, CachePoint)):
            raise ValueError(f"DualPathLLM takes text messages only, not a {type(block).__name__}")
    out: dict[str, Any] = {"role": role, "content": "\n".join(texts) or None}
    extra = message.additional_kwargs
    if role == "assistant":
        calls = message_tool_calls(message, default_id=f"call_{index}")
        if calls:
            out["tool_calls"] = calls
    if role == "tool" and extra.get("tool_call_id"):
        out["tool_call_id"] = str(extra["tool_call_id"])
    if isinstance(extra.get("name"), str) and extra["name"]:
        out["name"] = extra["name"]
    return out


def message_tool_calls(message: ChatMessage, default_id: str = "call") -> list[dict[str, Any]]:
    """A message's tool calls in OpenAI's shape (JSON-string arguments): its `ToolCallBlock`s, else
    `additional_kwargs["tool_calls"]` (dicts or OpenAI's objects). A call without an id gets one
    made from `default_id` and its position (the same each time the message is sent)."""
    calls = []
    blocks = [b for b in message.blocks if isinstance(b, ToolCallBlock)]
    for k, block in enumerate(blocks):
        args = block.tool_kwargs
        calls.append(
            {
                "id": block.tool_call_id or f"{default_id}_{k}",
                "type": "function",
                "function": {
                    "name": block.tool_name,
                    "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False),
                },
            }
        )
    if calls:
        return calls
    for k, raw in enumerate(message.additional_kwargs.get("tool_calls") or []):
        call = raw.model_dump() if hasattr(raw, "model_dump") else raw
        if not isinstance(call, Mapping) or not isinstance(call.get("function"), Mapping):
            continue  # not OpenAI's shape (a ToolSelection, ...)
        fn = call["function"]
        args = fn.get("arguments")
        calls.append(
            {
                "id": call.get("id") or f"{default_id}_{k}",
                "type": "function",
                "function": {
                    "name": fn.get("name"),
                    "arguments": args
                    if isinstance(args, str)
                    else json.dumps(args or {}, ensure_ascii=False),
                },
            }
        )
    return calls


def tool_choice(choice: Any) -> Any:
    """LlamaIndex's tool_choice as the SDK's: a mode, or a tool's name as OpenAI's named choice."""
    if isinstance(choice, str) and choice not in _TOOL_CHOICE_MODES:
        return {"type": "function", "function": {"name": choice}}
    return choice


def _schemas(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """Tools as OpenAI function schemas: LlamaIndex tools by their metadata, dicts as they are."""
    return [
        dict(t) if isinstance(t, Mapping) else t.metadata.to_openai_tool(skip_length_check=True)
        for t in tools
    ]


def _reads_calls(options: Mapping[str, Any]) -> bool:
    """Whether the reply is read for tool calls (then a stream holds back what may be one)."""
    return bool(options.get("tools")) and options.get("tool_choice") != "none"


def _info(session: Session, result: StepResult) -> dict[str, Any]:
    usage = result.usage
    return {
        "session_id": session.id,
        "prompt_tokens": usage.prompt_tokens,
        "cached_tokens": usage.cached_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "read_plan": result.load.plan,
        "finish_reason": result.finish_reason,
    }


def _raw(session: Session, result: StepResult, info: dict[str, Any]) -> dict[str, Any]:
    raw = dataclasses.asdict(result)
    usage = {k: info[k] for k in ("prompt_tokens", "cached_tokens", "completion_tokens", "total_tokens")}
    return {**raw, "usage": usage, "session_id": session.id}


def _response(session: Session, result: StepResult, delta: str | None = None) -> ChatResponse:
    blocks: list[Any] = []
    if result.text or not result.tool_calls:
        blocks.append(TextBlock(text=result.text))
    for call in result.tool_calls:
        fn = call["function"]
        blocks.append(ToolCallBlock(tool_call_id=call["id"], tool_name=fn["name"], tool_kwargs=_args(fn)))
    info = _info(session, result)
    return ChatResponse(
        message=ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks),
        delta=delta,
        raw=_raw(session, result, info),
        additional_kwargs=info,
    )


def _partial(text: str, delta: str) -> ChatResponse:
    return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta)


def _completion(response: ChatResponse) -> CompletionResponse:
    return CompletionResponse(
        text=response.message.content or "",
        delta=response.delta,
        raw=response.raw,
        additional_kwargs=response.additional_kwargs,
    )


def _args(fn: Mapping[str, Any]) -> dict[str, Any] | str:
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            parsed = json.loads(args)
        except ValueError:
            return args
        return parsed if isinstance(parsed, dict) else args
    return dict(args) if isinstance(args, Mapping) else {}


def _result(events: Iterator[StepChunk | StepResult]) -> StepResult:
    for item in events:
        if isinstance(item, StepResult):
            return item
    raise EngineUnavailable("the step ended without its result")


def _close(events: Iterator[Any]) -> None:
    close = getattr(events, "close", None)
    if close is not None:
        close()


async def _aclose(events: AsyncIterator[Any]) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()
