"""One step of a session, as an I/O-free flow both faces of `Session` drive (httpx's `auth_flow`).

`prepare` checks a turn and renders only its new tokens (pure: it raises InvalidInput before
anything happens). `step_flow` is a generator that does the rest of the step's work and asks its
driver for every piece of I/O by yielding an effect; the driver performs it (blocking in `step`,
awaiting in `astep`) and sends the reply back:

    Lookup  -> (keys of the cached prefix's blocks, cached tokens)
    Submit  -> None                       the step goes to the cluster
    Receive -> the next event              tokens (list[int]) or the StepOutcome; errors raise
    Emit    -> None                        a chunk for the caller
    Stop    -> None                        a stop string ended the reply: end the step now
    Commit  -> the saved manifest          the new history, saved under the session's lease

The generator returns the StepResult. Nothing outside the flow knows how a step is built, and
nothing inside it blocks: a driver that stops asking (a `break`, a cancelled task) leaves the
session as it was, because only Commit changes it.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from dualpath_sdk.api.inputs import NamedToolChoice, StepOptions
from dualpath_sdk.api.result import Load, Persist, StepChunk, StepResult, Timings, Usage
from dualpath_sdk.cluster.controller import StepOutcome, StepRequest
from dualpath_sdk.config import ReadPlanChoice
from dualpath_sdk.engine.sequence import SamplingParams
from dualpath_sdk.errors import ContextTooLong, InvalidInput
from dualpath_sdk.kv.keys import BlockKey
from dualpath_sdk.model.chat import continuation_ids, encode_chat, template_knows_tools
from dualpath_sdk.model.stops import StopStrings
from dualpath_sdk.model.tools import parse_tool_calls, tool_schemas
from dualpath_sdk.store.manifest import SessionManifest
from dualpath_sdk.store.prefix import history_keys


@dataclass(frozen=True)
class ModelFacts:
    """What a step needs to know of the cluster's model and configuration (no I/O behind it)."""

    tokenizer: PreTrainedTokenizerBase | None
    vocab_size: int
    max_context: int
    block_size: int
    mode: str
    read_plan: ReadPlanChoice
    root_key: Callable[[str], BlockKey]  # a tenant's key namespace

    def decode(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))


@dataclass(frozen=True)
class PreparedStep:
    prompt: list[int]  # the session's tokens and the turn's new ones
    new_messages: list[dict[str, Any]] | None  # None: a turn of raw token ids
    params: SamplingParams
    plan: ReadPlanChoice
    tools: list[dict[str, Any]]  # the session's function schemas ([]: none)
    stop: list[str]  # stop strings
    read_calls: bool = True  # with tools, whether the reply is read for tool calls (tool_choice "none": no)
    forced: str = ""  # the reply's opening, part of the prompt (tool_choice "required" or a named function)


@dataclass(frozen=True)
class Lookup:
    tenant: str
    prompt: list[int]
    history: int  # tokens the session held before this step


@dataclass(frozen=True)
class Submit:
    request: StepRequest


@dataclass(frozen=True)
class Receive:
    pass


@dataclass(frozen=True)
class Emit:
    chunk: StepChunk


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class Commit:
    manifest: SessionManifest
    keys: list[BlockKey]


Effect = Lookup | Submit | Receive | Emit | Stop | Commit
Flow = Generator[Effect, Any, StepResult]


def prepare(
    facts: ModelFacts,
    manifest: SessionManifest,
    new_ids: list[int] | None,
    new_messages: list[dict[str, Any]] | None,
    options: StepOptions,
) -> PreparedStep:
    """The step's prompt (only the new turn is rendered and tokenized) and its checked parameters.
    Exactly one of `new_ids` (raw tokens) and `new_messages` (a chat turn) is given.

    A session's tools are fixed by its first step that names them (they sit in its system prompt,
    in the cache): a step without `tools` keeps them, a step with other tools is InvalidInput."""
    tools = manifest.tools
    if options.tools is not None:
        tools = tool_schemas(options.tools)
        if manifest.token_ids and tools != manifest.tools:
            raise InvalidInput("a session's tools are fixed by its first step: start a new session")
    stop = list(StopStrings(options.stop).stops)  # InvalidInput for bad stop strings
    read_calls, forced = True, ""
    if new_ids is None:
        assert new_messages is not None
        read_calls, forced = _tool_choice(facts, tools, options.tool_choice)
        new_ids = _chat_ids(facts, manifest, new_messages, tools)
        if forced:
            assert facts.tokenizer is not None
            new_ids += facts.tokenizer.encode(forced, add_special_tokens=False)
    elif options.tools is not None or options.tool_choice not in (None, "auto"):
        raise InvalidInput("tools and tool_choice need a chat turn (step), not raw token ids")
    params = options.sampling()
    prompt = [*manifest.token_ids, *new_ids]
    vocab = facts.vocab_size
    if max(new_ids) >= vocab or any(t >= vocab for t in params.stop_token_ids or ()):
        raise InvalidInput(f"token ids must be in [0, {vocab})")
    if len(prompt) + params.max_tokens > facts.max_context:
        raise ContextTooLong(
            f"{len(prompt)} prompt tokens + max_tokens {params.max_tokens} "
            f"exceed the context of {facts.max_context}"
        )
    plan = options.read_plan or facts.read_plan
    if facts.mode == "basic" and plan in ("de", "split"):
        raise InvalidInput("a basic-mode cluster reads on the PE side only")
    return PreparedStep(prompt, new_messages, params, plan, tools, stop, read_calls, forced)


def _tool_choice(
    facts: ModelFacts, tools: list[dict[str, Any]], choice: str | NamedToolChoice | None
) -> tuple[bool, str]:
    """(whether the reply is read for tool calls, the opening it is made to begin with).

    "required" and a named function are honoured by putting the opening of a call in the template's
    tool-call form into the prompt: the model writes the rest of the call (`<tool_call>` blocks, or
    the Llama JSON form for a template that renders tools itself without them). Nothing constrains
    what follows, so a model can still write a malformed call, which is then plain text."""
    if choice is None or choice == "auto":
        return True, ""
    if choice == "none":
        return False, ""
    if not tools:
        raise InvalidInput(f"tool_choice {_choice_name(choice)} needs tools")
    name = choice.function.name if isinstance(choice, NamedToolChoice) else None
    if name is not None and name not in {t["function"]["name"] for t in tools}:
        raise InvalidInput(f"tool_choice names {name!r}, which is not one of the tools")
    tokenizer = facts.tokenizer
    if tokenizer is None:
        raise InvalidInput("the model has no tokenizer: use step_tokens")
    source = tokenizer.get_chat_template(tools=tools)
    if not template_knows_tools(source) or "<tool_call>" in source:  # ours (model/chat.py) or Hermes
        return True, '<tool_call>\n{"name": "' + (f'{name}", "arguments":' if name else "")
    if '"parameters"' in source:  # Llama 3.x: the whole reply is {"name": ..., "parameters": ...}
        return True, '{"name": "' + (f'{name}", "parameters":' if name else "")
    raise InvalidInput(
        f"tool_choice {_choice_name(choice)}: the model's chat template writes tool calls in a form "
        "this SDK does not know, so the reply cannot be made to call a tool"
    )


def _choice_name(choice: str | NamedToolChoice) -> str:
    return repr(choice) if isinstance(choice, str) else f"function {choice.function.name!r}"


def _chat_ids(
    facts: ModelFacts, manifest: SessionManifest, new: list[dict[str, Any]], tools: list[dict[str, Any]]
) -> list[int]:
    tokenizer = facts.tokenizer
    if tokenizer is None:
        raise InvalidInput("the model has no tokenizer: use step_tokens")
    history = manifest.messages
    if not manifest.token_ids:
        return encode_chat(tokenizer, [*history, *new], tools=tools)
    if not history or history[-1].get("role") != "assistant":
        raise InvalidInput("this session was stepped with raw token ids: continue it with step_tokens")
    ended_with_stop = manifest.token_ids[-1] == tokenizer.eos_token_id
    return continuation_ids(tokenizer, history, new, ended_with_stop, tools)


def step_flow(facts: ModelFacts, manifest: SessionManifest, step: PreparedStep) -> Flow:
    prompt = step.prompt
    keys, cached = yield Lookup(manifest.tenant, prompt, len(manifest.token_ids))
    yield Submit(StepRequest(prompt, step.params, manifest.tenant, keys, step.plan, cached))
    generated: list[int] = []
    stops = StopStrings(step.stop)
    text, decoded, stopped = step.forced, "", False  # emitted so far; the decode of `generated`
    pending: list[int] = []  # tokens whose text is not out yet
    if step.forced:  # the reply's opening, already in the prompt: its text is the reply's too
        yield Emit(StepChunk(step.forced, []))
    while not isinstance(event := (yield Receive()), StepOutcome):
        if stopped:
            continue  # tokens already on their way when the stop string ended the reply
        generated += event
        pending += event
        full = facts.decode(generated)
        delta = full[len(decoded) :]
        if delta.endswith("\ufffd"):
            continue  # half a character: wait for its other bytes
        decoded = full
        safe, stopped = stops.feed(delta)
        text += safe
        yield Emit(StepChunk(safe, pending))
        pending = []
        if stopped:
            yield Stop()
    if not stopped:
        tail = facts.decode(generated)[len(decoded) :] + stops.flush()
        text += tail
        if tail or pending:
            yield Emit(StepChunk(tail, pending))
    content, calls = parse_tool_calls(text) if step.tools and step.read_calls else (text, [])
    finish = "stop" if stopped else event.finish_reason  # a stop string ends it, whatever came after
    reason = "tool_calls" if calls and finish != "length" else finish
    messages = list(manifest.messages)
    if step.new_messages is not None:
        reply: dict[str, Any] = {"role": "assistant", "content": content or None}
        messages += [*step.new_messages, {**reply, "tool_calls": calls} if calls else reply]
    tokens = [*prompt, *generated]
    all_keys = history_keys(facts.root_key(manifest.tenant), tokens, facts.block_size)
    update: Mapping[str, Any] = {
        "token_ids": tokens,
        "messages": messages,
        "block_keys": [k.hex() for k in all_keys],
        "tools": step.tools,
        "marks": [*manifest.marks, (len(messages), len(tokens))],
    }
    yield Commit(manifest.model_copy(update=update), all_keys)
    return _result(content if calls else text, generated, prompt, event, reason, calls)


def _result(
    text: str,
    generated: list[int],
    prompt: list[int],
    o: StepOutcome,
    finish_reason: str,
    tool_calls: list[dict[str, Any]],
) -> StepResult:
    tpot = o.decode_s / max(len(generated) - 1, 1)
    return StepResult(
        text=text,
        token_ids=generated,
        finish_reason=finish_reason,
        tool_calls=tool_calls,
        usage=Usage(len(prompt), o.num_cached, len(generated)),
        load=Load(o.plan, o.bytes_pe, o.bytes_de),
        persist=Persist(o.persisted, o.persist_failed),
        timings=Timings(o.queue_s, o.read_s, o.prefill_s, o.ttft_s, o.decode_s, tpot),
    )
