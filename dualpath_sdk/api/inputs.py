"""The public API's boundary: every argument a caller passes is validated here, by type and range,
before anything is submitted. Ints are ints (no 8.5, no "8", no True), floats are finite, names are
short and safe. A bad argument is InvalidInput naming the field; nothing was changed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dualpath_sdk.config import ReadPlanChoice
from dualpath_sdk.engine.sequence import MAX_SEED, SamplingParams
from dualpath_sdk.errors import InvalidInput

TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
SESSION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
TokenId = Annotated[int, Field(ge=0, strict=True)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid", frozen=True)


class ToolChoiceFunction(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")


class NamedToolChoice(_Strict):
    """OpenAI's `{"type": "function", "function": {"name": ...}}`: the reply calls this function."""

    type: Literal["function"]
    function: Annotated[ToolChoiceFunction, Field(strict=False)]


ToolChoiceMode = Literal["auto", "none", "required"]


class StepOptions(_Strict):
    """The keywords of `Session.step` / `step_tokens` / `stream`."""

    max_tokens: int = Field(default=128, ge=1)
    temperature: float = Field(default=0.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, lt=MAX_SEED)
    stop_token_ids: Annotated[list[TokenId], Field(strict=False)] | None = None  # a list or a tuple
    ignore_eos: bool = False
    read_plan: ReadPlanChoice | None = None  # None: the cluster's
    stop: str | Annotated[list[str], Field(strict=False)] | None = None  # stop strings
    tools: Annotated[list[dict[str, Any]], Field(strict=False)] | None = None  # OpenAI function schemas
    # "auto" (None): the reply may call tools; "none": it is read as text; "required" or a named
    # function: it is made to begin with the tool-call markup (api/flow.py)
    tool_choice: ToolChoiceMode | Annotated[NamedToolChoice, Field(strict=False)] | None = None

    def sampling(self) -> SamplingParams:
        stops = tuple(self.stop_token_ids) if self.stop_token_ids else None
        return SamplingParams(
            self.max_tokens, self.temperature, self.top_p, self.seed, stops, self.ignore_eos
        )


class TokenTurn(_Strict):
    """The ids of `Session.step_tokens`: a non-empty list (or tuple) of token ids."""

    token_ids: Annotated[list[TokenId], Field(min_length=1, strict=False)]


class SessionOptions(_Strict):
    """The arguments of `Cluster.session`."""

    system: str | None = Field(default=None, min_length=1)
    session_id: str | None = Field(default=None, pattern=SESSION_ID_PATTERN)
    tenant: str = Field(default="default", pattern=TENANT_PATTERN)
    ttl_s: float = Field(default=3600.0, gt=0)


class ResumeOptions(_Strict):
    """The arguments of `Cluster.resume`."""

    session_id: str = Field(pattern=SESSION_ID_PATTERN)
    tenant: str = Field(default="default", pattern=TENANT_PATTERN)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ToolCallFunction(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    arguments: str | dict[str, Any]  # OpenAI sends a JSON string


class ToolCall(_Strict):
    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Strict):
    """One message of a turn: the roles chat templates know, text content (a string or text parts),
    an assistant's tool calls (its content may then be None) and a tool result's call id."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str | Annotated[list[TextPart], Field(strict=False, min_length=1)] | None = None
    name: str | None = Field(default=None, min_length=1, max_length=256)
    tool_call_id: str | None = Field(default=None, min_length=1, max_length=256)
    tool_calls: Annotated[list[ToolCall], Field(strict=False, min_length=1)] | None = None

    @model_validator(mode="after")
    def _content_or_calls(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only an assistant message carries tool_calls")
        if not self.content and self.tool_calls is None:
            raise ValueError("content must be non-empty (or an assistant message's tool_calls given)")
        return self


M = TypeVar("M", bound=BaseModel)


def validated(model: type[M], what: str, values: Mapping[str, Any]) -> M:
    """`values` as a `model`, or InvalidInput that names each bad field."""
    try:
        return model.model_validate(dict(values))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']} (got {_short(e.get('input'))})"
            for e in exc.errors()
        )
        raise InvalidInput(f"{what}: {problems}") from None


def turn_messages(turn: object) -> list[dict[str, Any]]:
    """A turn as messages: a user string, one message, or a non-empty list of messages."""
    if isinstance(turn, str):
        return [
            validated(ChatMessage, "turn", {"role": "user", "content": turn}).model_dump(exclude_none=True)
        ]
    if isinstance(turn, Mapping):
        items: Sequence[object] = [turn]
    elif isinstance(turn, Sequence) and turn:
        items = turn
    else:
        raise InvalidInput(
            f"a turn is a string, a message or a non-empty list of messages, not {_short(turn)}"
        )
    messages = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise InvalidInput(f"message {i} of the turn is {_short(item)}, not a mapping")
        messages.append(validated(ChatMessage, f"message {i}", item).model_dump(exclude_none=True))
    return messages


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
