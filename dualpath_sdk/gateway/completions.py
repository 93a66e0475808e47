"""The OpenAI-compatible endpoint: `POST /v1/chat/completions` and `GET /v1/models`.

Each request carries the whole conversation; api/history.py maps it onto one of the tenant's
sessions, so only the messages the session does not hold yet are prefilled. The answer is OpenAI's
`chat.completion`, or its stream of `chat.completion.chunk`s, plus the `session_id` that now holds
the conversation (also the `X-Session-ID` header; a request may name one the same two ways).

What would change the reply and cannot be honoured (n > 1, logprobs, penalties, logit bias,
response formats, unknown parameters) is refused, not ignored; bookkeeping parameters (user,
metadata, store: false, ...) are accepted. The model must be the served one (`GET /v1/models`).
Unlike the sessions API (temperature 0), an unset temperature is OpenAI's default, 1.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dualpath_sdk.api.cluster import Cluster
from dualpath_sdk.api.history import History
from dualpath_sdk.api.inputs import ChatMessage, validated
from dualpath_sdk.api.result import StepChunk, StepResult, Usage
from dualpath_sdk.errors import DualPathError, InvalidInput
from dualpath_sdk.gateway.auth import tenant_for
from dualpath_sdk.gateway.http import SSE_HEADERS, body_json, error_response, sse
from dualpath_sdk.model.tools import HeldText, tool_schemas

OPENAI_TEMPERATURE = 1.0
SESSION_HEADER = "X-Session-ID"
_CREATED = int(time.time())

# Parameters that change nothing in the reply here; any value is accepted.
_BOOKKEEPING = {
    "user",
    "metadata",
    "parallel_tool_calls",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
}
# Parameters accepted only at the value that leaves the reply as we make it.
_ONLY: dict[str, tuple[Callable[[Any], bool], str]] = {
    "n": (lambda v: v == 1 and not isinstance(v, bool), "n must be 1: one choice per request"),
    "logprobs": (lambda v: v is False, "logprobs are not available"),
    "top_logprobs": (lambda v: v == 0 and not isinstance(v, bool), "logprobs are not available"),
    "presence_penalty": (lambda v: v == 0 and not isinstance(v, bool), "penalties are not supported"),
    "frequency_penalty": (lambda v: v == 0 and not isinstance(v, bool), "penalties are not supported"),
    "logit_bias": (lambda v: v == {}, "logit_bias is not supported"),
    "response_format": (lambda v: v == {"type": "text"}, "only the text response format is supported"),
    "modalities": (lambda v: v == ["text"], "only text output is supported"),
    "store": (lambda v: v is False, "completions are not stored"),
}
# Parameters passed on to the step (after the checks below).
_STEP = {"max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop"}
_STEP |= {"tools", "tool_choice"}
_OWN = {"model", "messages", "stream", "stream_options", "session_id", "tenant"}
_KNOWN = _BOOKKEEPING | _ONLY.keys() | _STEP | _OWN


@dataclass(frozen=True)
class ChatRequest:
    """A checked request: its messages (as the SDK takes them), the step's options, and the rest."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    options: dict[str, Any]
    stream: bool
    include_usage: bool
    session_id: str | None
    read_calls: bool  # the reply may hold tool calls (so a stream holds back what may start one)


def parse(body: Mapping[str, Any], served: str, header_session: str | None = None) -> ChatRequest:
    """The request checked: InvalidInput names what cannot be honoured."""
    body = {k: v for k, v in body.items() if v is not None}  # null is "not given", as OpenAI reads it
    unknown = sorted(body.keys() - _KNOWN)
    if unknown:
        raise InvalidInput(f"unsupported parameters: {', '.join(unknown)}")
    for name, (ok, why) in _ONLY.items():
        if name in body and not ok(body[name]):
            raise InvalidInput(f"{name}={body[name]!r}: {why}")
    if "model" in body and body["model"] != served:
        raise InvalidInput(f"model {body['model']!r} is not served here: this gateway serves {served!r}")
    messages = [_message(m, i) for i, m in enumerate(_list(body.get("messages"), "messages"))]
    if messages[-1]["role"] == "assistant":
        raise InvalidInput("the last message is the assistant's: there is nothing to reply to")
    options: dict[str, Any] = {k: body[k] for k in ("temperature", "top_p", "seed", "stop") if k in body}
    options.setdefault("temperature", OPENAI_TEMPERATURE)
    limits = [body[k] for k in ("max_completion_tokens", "max_tokens") if k in body]
    if len(limits) == 2 and limits[0] != limits[1]:
        raise InvalidInput("max_tokens and max_completion_tokens differ: give one of them")
    if limits:
        options["max_tokens"] = limits[0]
    tools = tool_schemas(body["tools"]) if body.get("tools") else []
    choice = body.get("tool_choice", "auto")
    if tools:
        options["tools"] = tools
        options["tool_choice"] = choice
    elif choice not in ("auto", "none"):
        raise InvalidInput(f"tool_choice {choice!r} needs tools")
    stream = body.get("stream", False)
    stream_options = body.get("stream_options", {})
    if not isinstance(stream, bool) or not isinstance(stream_options, dict):
        raise InvalidInput("stream is true or false, stream_options an object")
    include_usage = stream_options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise InvalidInput("stream_options.include_usage is true or false")
    session_id = body.get("session_id", header_session)
    if session_id is not None and not isinstance(session_id, str):
        raise InvalidInput("session_id must be a string")
    if header_session is not None and session_id != header_session:
        raise InvalidInput(f"the body's session_id and the {SESSION_HEADER} header differ")
    read_calls = bool(tools) and choice != "none"
    return ChatRequest(messages, tools, options, stream, include_usage, session_id, read_calls)


def _list(value: object, what: str) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise InvalidInput(f"{what} must be a non-empty list")
    return value


def _message(message: object, i: int) -> dict[str, Any]:
    """A message as OpenAI clients send it, as the SDK takes it: the fields OpenAI's responses
    carry and clients echo back (null or empty: refusal, audio, annotations, function_call) are
    dropped, "developer" is the system role, tool calls lose a stream's `index`. An empty reply
    (the model ended at once) is kept as the session stored it, content None: the SDK takes no
    empty message in a turn, but it is history, found in a session."""
    if not isinstance(message, Mapping):
        raise InvalidInput(f"message {i} is not an object")
    out = {k: v for k, v in message.items() if v is not None and k != "annotations"}
    for key in ("refusal", "audio", "function_call"):
        if key in out:
            if out[key]:
                raise InvalidInput(f"message {i}: {key} is not supported")
            del out[key]
    if out.get("role") == "developer":
        out["role"] = "system"
    if out.get("tool_calls") == []:
        del out["tool_calls"]
    elif isinstance(out.get("tool_calls"), list):
        out["tool_calls"] = [
            {k: v for k, v in c.items() if k != "index"} if isinstance(c, Mapping) else c
            for c in out["tool_calls"]
        ]
    if out.get("role") == "assistant" and not out.get("content") and set(out) <= {"role", "content"}:
        return {"role": "assistant", "content": None}
    return validated(ChatMessage, f"message {i}", out).model_dump(exclude_none=True)


async def chat_completions(request: Request) -> Response:
    cluster: Cluster = request.app.state.cluster
    served = cluster.model_id
    body = await body_json(request)
    asked = body.get("tenant")
    if asked is not None and not isinstance(asked, str):
        raise InvalidInput("tenant must be a string")
    tenant = tenant_for(request, asked)  # before the body's checks: a caller without a key learns nothing
    chat = parse(body, served, request.headers.get(SESSION_HEADER))
    history = _history(request, cluster)
    session, events = await history.astep(
        chat.messages, tenant=tenant, session_id=chat.session_id, **chat.options
    )
    head = {
        "id": f"chatcmpl-{secrets.token_hex(12)}",
        "created": int(time.time()),
        "model": served,
        "system_fingerprint": None,
        "session_id": session.id,
    }
    headers = {SESSION_HEADER: session.id}
    if chat.stream:
        stream = stream_chunks(request.url.path, chat, head, events)
        return StreamingResponse(stream, media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
    try:
        item = await anext(events)
        while not isinstance(item, StepResult):
            item = await anext(events)
    finally:
        await events.aclose()  # the session is re-indexed as it is now
    return JSONResponse(_completion(head, item), headers=headers)


def _completion(head: dict[str, Any], result: StepResult) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": result.text, "refusal": None}
    if result.tool_calls:
        message["content"] = result.text or None
        message["tool_calls"] = result.tool_calls
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": result.finish_reason}
    return {**head, "object": "chat.completion", "choices": [choice], "usage": _usage(result.usage)}


def _usage(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


async def stream_chunks(
    path: str,
    chat: ChatRequest,
    head: dict[str, Any],
    events: AsyncIterator[StepChunk | StepResult],
) -> AsyncIterator[bytes]:
    """The step's `events` (History.astep's: the first one included) as `chat.completion.chunk`s."""

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        data = {**head, "object": "chat.completion.chunk", "choices": [choice]}
        return sse({**data, "usage": None} if chat.include_usage else data)

    held = HeldText(chat.read_calls)
    try:
        item = await anext(events)
        yield chunk({"role": "assistant", "content": ""})
        while isinstance(item, StepChunk):
            if delta := held.feed(item.text):
                yield chunk({"content": delta})
            item = await anext(events)
        if rest := held.rest(item.text):
            yield chunk({"content": rest})
        if item.tool_calls:
            calls = [{"index": i, **call} for i, call in enumerate(item.tool_calls)]
            yield chunk({"tool_calls": calls})
        yield chunk({}, item.finish_reason)
        if chat.include_usage:
            yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(item.usage)})
        yield b"data: [DONE]\n\n"
    except DualPathError as exc:  # after the first event the status is sent: the error is an event
        yield sse(json.loads(bytes(error_response(path, exc).body)))
    finally:  # a client gone mid-step: the step is cancelled, the session unchanged (and re-indexed)
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


async def models(request: Request) -> Response:
    tenant_for(request, None)  # with keys, a key is needed here too
    cluster: Cluster = request.app.state.cluster
    model = {"id": cluster.model_id, "object": "model", "created": _CREATED, "owned_by": "dualpath"}
    model["max_model_len"] = cluster.max_context  # as vLLM lists it: the context window
    return JSONResponse({"object": "list", "data": [model]})


def _history(request: Request, cluster: Cluster) -> History:
    """The app's history index, made at its first completion."""
    state = request.app.state
    if not hasattr(state, "chat_history"):
        state.chat_history = History(cluster)
    history: History = state.chat_history
    return history


routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/models", models, methods=["GET"]),
]
