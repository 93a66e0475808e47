"""Tool calling: validate OpenAI function schemas, and read tool calls out of a model's reply.

Models write tool calls as text. Two forms are read: the Hermes/Qwen form, one or several
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks, and the JSON form of Llama 3.x
templates, where the whole reply is `{"name": ..., "parameters": {...}}`, optionally after
`<|python_tag|>`. Anything else (another format, broken JSON, an unclosed block) is plain text.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping
from typing import Any

from dualpath_sdk.errors import InvalidInput

TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_PYTHON_TAG = "<|python_tag|>"
_JSON_FORM_KEYS = frozenset({"type", "name", "parameters", "arguments"})


def tool_schemas(tools: object) -> list[dict[str, Any]]:
    """`tools` checked as OpenAI function schemas, as plain JSON-able dicts (None: no tools).

    Each is `{"type": "function", "function": {"name", "description"?, "parameters"?}}`; names are
    unique and match `^[A-Za-z0-9_-]{1,64}$`; parameters, when given, are a JSON-able dict.
    """
    if tools is None:
        return []
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, (list, tuple)):
        raise InvalidInput("tools must be a list of function schemas")
    out: list[dict[str, Any]] = []
    names: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            raise InvalidInput(f'{where} must be {{"type": "function", "function": {{...}}}}')
        fn = tool.get("function")
        if not isinstance(fn, Mapping):
            raise InvalidInput(f"{where}.function must be a dict with a name")
        unknown = set(fn) - {"name", "description", "parameters", "strict"}
        if unknown:
            raise InvalidInput(f"{where}.function has unknown keys {sorted(unknown)}")
        name = fn.get("name")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise InvalidInput(f"{where}.function.name must match ^[A-Za-z0-9_-]{{1,64}}$")
        if name in names:
            raise InvalidInput(f"{where}: tool name {name!r} is given twice")
        names.add(name)
        if "description" in fn and not isinstance(fn["description"], str):
            raise InvalidInput(f"{where}.function.description must be a string")
        if "parameters" in fn and not isinstance(fn["parameters"], Mapping):
            raise InvalidInput(f"{where}.function.parameters must be a dict (a JSON schema)")
        try:  # a JSON round trip: plain dicts, and nothing a template could not print
            out.append(json.loads(json.dumps({"type": "function", "function": dict(fn)})))
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"{where} is not JSON-serializable: {exc}") from None
    return out


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """(the reply without its tool-call markup, its tool calls in OpenAI's shape).

    Each call is `{"id": "call_<12 hex>", "type": "function", "function": {"name", "arguments"}}`
    with `arguments` a JSON string. Without (well-formed) tool calls: `(text, [])`, text untouched;
    one malformed `<tool_call>` block makes the whole reply plain text.
    """
    blocks = list(_HERMES_BLOCK.finditer(text))
    if blocks:
        calls = [_call(_json(m.group(1)), require_args=False) for m in blocks]
        if any(c is None for c in calls):
            return text, []
        rest = _HERMES_BLOCK.sub("", text)
        if "<tool_call>" in rest or "</tool_call>" in rest:  # an unclosed or stray block
            return text, []
        return rest.strip(), [c for c in calls if c is not None]
    body = text.strip()
    body = body.removeprefix(_PYTHON_TAG).strip()
    obj = _json(body) if body.startswith("{") else None
    if isinstance(obj, dict) and set(obj) <= _JSON_FORM_KEYS and obj.get("type", "function") == "function":
        call = _call(obj, require_args=True)
        if call is not None:
            return "", [call]
    return text, []


def tool_call_text(name: str, arguments: object) -> str:
    """One call in the Hermes form, as the fallback tools prompt asks models to write it."""
    return (
        f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n</tool_call>"
    )


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _call(obj: object, require_args: bool) -> dict[str, Any] | None:
    """The OpenAI-shaped call for a parsed `{"name": ..., "arguments" | "parameters": {...}}`, or
    None if it is not one (arguments missing: `{}`, unless `require_args`)."""
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    keys = [k for k in ("arguments", "parameters") if k in obj]
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name) or len(keys) > 1:
        return None
    if require_args and not keys:
        return None
    args = obj[keys[0]] if keys else {}
    if isinstance(args, str):  # arguments already encoded as a JSON string
        args = _json(args)
    if not isinstance(args, dict):
        return None
    return {
        "id": f"call_{secrets.token_hex(6)}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)},
    }


class HeldText:
    """A reply's text as content deltas. With tools, what may be (the start of) a tool call is held
    back: from a `<tool_call>` (or a partial one at the end) on, trailing whitespace (a call's
    removal strips it), and all of a reply that opens with `{` (the JSON form is the whole reply).
    `rest` gives what the final content adds to what went out."""

    OPEN = "<tool_call>"

    def __init__(self, hold: bool) -> None:
        self._hold = hold
        self._text = ""
        self._sent = 0

    def feed(self, text: str) -> str:
        self._text += text
        end = self._safe_end() if self._hold else len(self._text)
        if end <= self._sent:
            return ""
        delta, self._sent = self._text[self._sent : end], end
        return delta

    def rest(self, content: str) -> str:
        sent = self._text[: self._sent]
        return content[len(sent) :] if content.startswith(sent) else ""

    def _safe_end(self) -> int:
        text = self._text
        body = text.lstrip()
        if not body or body.startswith("{"):
            return 0
        end = text.find(self.OPEN)
        if end < 0:
            end = len(text)
            for k in range(min(len(self.OPEN) - 1, len(text)), 0, -1):
                if self.OPEN.startswith(text[-k:]):
                    end -= k
                    break
        return len(text[:end].rstrip())
