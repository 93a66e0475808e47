"""Chat messages -> token ids, with the model's own chat template.

Messages and tools in OpenAI's shapes are first mapped onto what the template understands
(`normalize_messages`): a template that knows nothing of tools gets them in the Hermes style, as a
tools block in the system message, tool calls as `<tool_call>` text and tool results as a user
message wrapping `<tool_response>`. The caller's messages stay as they were: they are the history.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from dualpath_sdk.errors import InvalidInput
from dualpath_sdk.model.tools import tool_call_text, tool_schemas

_KNOWS_TOOLS = re.compile(r"\btools\b")
_KNOWS_TOOL_ROLE = re.compile(r"""["']tool["']""")

TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> list[int]:
    """Render `messages` and `tools` with the tokenizer's chat template; tokenize the text as it stands."""
    text = render_chat(tokenizer, messages, add_generation_prompt, tools)
    return list(tokenizer.encode(text, add_special_tokens=False))


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """The chat template's text for `messages` and `tools` (OpenAI function schemas, or None).

    A template that refuses the messages, or tools that are not function schemas, are InvalidInput.
    """
    schemas = tool_schemas(tools)
    if not tokenizer.chat_template:
        raise InvalidInput("the model's tokenizer has no chat template")
    try:
        source = tokenizer.get_chat_template(tools=schemas or None)
    except ValueError as exc:
        raise InvalidInput(f"the model's tokenizer has no usable chat template: {exc}") from None
    native: list[Any] | None = schemas if schemas and template_knows_tools(source) else None
    try:
        return str(
            tokenizer.apply_chat_template(
                normalize_messages(messages, source, schemas),
                tools=native,
                chat_template=source,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
            )
        )
    except InvalidInput:
        raise
    except Exception as exc:  # jinja2's TemplateError, or whatever a model's template raises
        raise InvalidInput(f"the model's chat template refused the messages: {exc}") from None


def template_knows_tools(template_source: str) -> bool:
    """Whether the template renders a `tools` list itself (else the tools go in the system prompt)."""
    return bool(_KNOWS_TOOLS.search(template_source))


def normalize_messages(
    messages: Sequence[Mapping[str, Any]],
    template_source: str,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """`messages` (and validated `tools`) mapped onto what the template understands; new dicts.

    - content given as text parts (`[{"type": "text", "text": ...}]`) is joined with newlines;
    - an assistant message's `tool_calls` stay tool calls (arguments as a dict) if the template
      mentions `tool_calls`, else become Hermes `<tool_call>` text after the content;
    - a `tool` message stays one if the template has a tool role, else becomes a user message
      wrapping `<tool_response>...</tool_response>`;
    - tools the template does not render become a Hermes tools block at the end of the first
      system message (or a new leading one): before every reply, so a history renders the same
      every turn the same tools are given.
    """
    knows_calls = "tool_calls" in template_source
    knows_tool_role = bool(_KNOWS_TOOL_ROLE.search(template_source))
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidInput(f"message {i} is not a mapping")
        msg = dict(message)
        role = msg.get("role")
        content = _text(msg.get("content"), f"message {i}")
        if role == "assistant" and msg.get("tool_calls"):
            calls = _calls(msg["tool_calls"], f"message {i}")
            if knows_calls:
                msg["tool_calls"] = [
                    {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}
                    for cid, name, args in calls
                ]
                if "content" in msg:
                    msg["content"] = content
            else:
                del msg["tool_calls"]
                text = "\n".join(tool_call_text(name, args) for _, name, args in calls)
                msg["content"] = f"{content}\n{text}" if content else text
        elif role == "tool" and not knows_tool_role:
            msg = {"role": "user", "content": f"<tool_response>\n{content or ''}\n</tool_response>"}
        else:
            msg["content"] = content or ""
        out.append(msg)
    if tools and not template_knows_tools(template_source):
        block = TOOLS_PROMPT.format(tools=json.dumps(list(tools), ensure_ascii=False))
        if out and out[0].get("role") == "system":
            system = out[0]["content"]
            out[0] = {**out[0], "content": f"{system}\n\n{block}" if system else block}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def _text(content: object, where: str) -> str | None:
    """A message's content as text: a string, text parts joined with newlines, or None."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        texts = []
        for part in content:
            if (
                not isinstance(part, Mapping)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise InvalidInput(f'{where}: content parts must be {{"type": "text", "text": "..."}}')
            texts.append(part["text"])
        return "\n".join(texts)
    raise InvalidInput(f"{where}: content must be a string or a list of text parts")


def _calls(tool_calls: object, where: str) -> list[tuple[str | None, str, object]]:
    """(id, name, arguments) of each OpenAI-shaped tool call; arguments decoded if they are JSON."""
    if not isinstance(tool_calls, (list, tuple)):
        raise InvalidInput(f"{where}: tool_calls must be a list")
    calls: list[tuple[str | None, str, object]] = []
    for call in tool_calls:
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise InvalidInput(
                f'{where}: a tool call is {{"id", "type": "function", "function": {{"name", "arguments"}}}}'
            )
        args = fn.get("arguments", {})
        if isinstance(args, str):
            with contextlib.suppress(ValueError):  # not JSON: shown to the model as the string it was
                args = json.loads(args)
        call_id = call.get("id")
        calls.append((call_id if isinstance(call_id, str) else None, fn["name"], args))
    return calls


_SENTINEL = "\u2063dualpath-sentinel\u2063"


def continuation_text(
    tokenizer: PreTrainedTokenizerBase,
    history: Sequence[Mapping[str, Any]],
    new: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """The text that extends a conversation whose last message is the model's reply: the reply's
    closing, then `new` with the generation prompt.

    The template is rendered with a sentinel as the reply (its content and tool calls: both are
    the model's own tokens already) and the text after the sentinel is returned. So the render of
    `history + new` is the render of `history[:-1]` with the generation prompt, then the reply, then
    this text, as long as the template puts nothing that changes after a reply (the fallback tools
    block sits in the system message, before it).
    """
    if not history or history[-1].get("role") != "assistant":
        raise InvalidInput("a continuation follows the model's reply")
    reply = {k: v for k, v in history[-1].items() if k != "tool_calls"}
    text = render_chat(tokenizer, [*history[:-1], {**reply, "content": _SENTINEL}, *new], True, tools)
    parts = text.split(_SENTINEL)
    if len(parts) != 2:
        raise InvalidInput("the model's chat template does not render the reply's content once")
    return parts[1]


def continuation_ids(
    tokenizer: PreTrainedTokenizerBase,
    history: Sequence[Mapping[str, Any]],
    new: Sequence[Mapping[str, Any]],
    ended_with_stop: bool,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> list[int]:
    """The token ids that extend a conversation whose last message is the model's reply.

    The history's ids are never re-tokenized (a one-token change would miss the cache for the whole
    tail): only `continuation_text` is tokenized. When generation stopped on the stop token, the ids
    already hold the closing's first token.
    """
    tail = continuation_text(tokenizer, history, new, tools)
    ids = list(tokenizer.encode(tail, add_special_tokens=False))
    if ended_with_stop and ids and ids[0] == tokenizer.eos_token_id:
        ids = ids[1:]
    return ids
