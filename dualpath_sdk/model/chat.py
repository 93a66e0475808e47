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
    text = tokenizer.apply_chat_template(
        [dict(m) for m in messages],
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
    )
    return list(tokenizer.encode(str(text), add_special_tokens=False))
