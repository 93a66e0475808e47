"""Chat messages -> token ids, with the model's own chat template."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from dualpath_sdk.errors import InvalidInput


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
) -> list[int]:
    """Render `messages` with the tokenizer's chat template and tokenize the text as it stands."""
    if not tokenizer.chat_template:
        raise InvalidInput("the model's tokenizer has no chat template")
    text = _render(tokenizer, [dict(m) for m in messages], add_generation_prompt)
    return list(tokenizer.encode(text, add_special_tokens=False))


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], generation: bool) -> str:
    """The chat template's text; a template that refuses the messages is InvalidInput."""
    try:
        return str(tokenizer.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False))
    except Exception as exc:  # jinja2's TemplateError, or whatever a model's template raises
        raise InvalidInput(f"the model's chat template refused the messages: {exc}") from None


_SENTINEL = "\u2063dualpath-sentinel\u2063"


def continuation_ids(
    tokenizer: PreTrainedTokenizerBase,
    history: Sequence[Mapping[str, Any]],
    new: Sequence[Mapping[str, Any]],
    ended_with_stop: bool,
) -> list[int]:
    """The token ids that extend a conversation whose last message is the model's reply.

    The history's ids are never re-tokenized (a one-token change would miss the cache for the whole
    tail): the template is rendered with a sentinel as the reply, and only the text after it (the
    reply's closing and the new messages with the generation prompt) is tokenized. When generation
    stopped on the stop token, the ids already hold the closing's first token.
    """
    last = dict(history[-1])
    if last.get("role") != "assistant":
        raise InvalidInput("a continuation follows the model's reply")
    text = _render(
        tokenizer,
        [*[dict(m) for m in history[:-1]], {**last, "content": _SENTINEL}, *[dict(m) for m in new]],
        True,
    )
    tail = text.split(_SENTINEL, 1)[1]
    ids = list(tokenizer.encode(tail, add_special_tokens=False))
    if ended_with_stop and ids and ids[0] == tokenizer.eos_token_id:
        ids = ids[1:]
    return ids
