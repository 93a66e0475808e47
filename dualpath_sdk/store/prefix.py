"""The cached prefix of a prompt: the stored blocks a step loads instead of computing, token-exact.

A session's previous step computed the KV of every token it held except the last one sampled (that
token's KV is computed by the next step), and stored it as Full Blocks plus, when that count is not
a multiple of the block size, one partial block under its `partial_key` (kv/keys.py). So the next
step's cached prefix is its prompt's longest run of stored Full Blocks and then, if those reach the
partial block's position, that partial block: `history - 1` tokens when everything is stored.
At least one prompt token is always computed (its logits give the first token), so a prefix never
covers the whole prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from dualpath_sdk.kv.keys import BlockKey, block_keys, partial_key
from dualpath_sdk.store.backend import BlockStore


class StoredPrefix(NamedTuple):
    """The cached prefix of a prompt: its blocks' keys in chain order (Full Blocks, then the partial
    block when `tokens` is not a multiple of the block size) and the tokens they hold."""

    keys: list[BlockKey]
    tokens: int


def cached_prefix(
    store: BlockStore | None, root: BlockKey, prompt: Sequence[int], block_size: int, history: int
) -> StoredPrefix:
    """The stored prefix of `prompt`, whose first `history` tokens the session held before this step.

    Full Blocks are found by key wherever they came from (this session, a fork, another session
    with the same prefix); a partial block only at the end of the session's history, where the
    previous step left it. `store` None (oracle mode: nothing is stored) counts the history's
    blocks as stored.
    """
    limit = len(prompt) - 1  # the last prompt token is always computed
    keys = block_keys(root, prompt[: limit // block_size * block_size], block_size)
    end = min(history - 1, limit)  # tokens whose KV the previous step computed
    full = min(len(keys), max(end, 0) // block_size) if store is None else store.longest_prefix(keys)
    if end <= full * block_size or end >= (full + 1) * block_size:
        return StoredPrefix(keys[:full], full * block_size)  # no partial block ends this prefix
    partial = partial_key(keys[full - 1] if full else root, prompt[full * block_size : end])
    if store is not None and not store.contains(partial):
        return StoredPrefix(keys[:full], full * block_size)
    return StoredPrefix([*keys[:full], partial], end)


def history_keys(root: BlockKey, tokens: Sequence[int], block_size: int) -> list[BlockKey]:
    """The keys of the blocks a step leaves stored for a session now holding `tokens`: the Full
    Blocks of every token but the last (whose KV the next step computes), then the partial block of
    the rest. A session pins these, and a fork pins them for itself."""
    computed = tokens[: max(len(tokens) - 1, 0)]
    keys = block_keys(root, computed, block_size)
    rest = computed[len(keys) * block_size :]
    return [*keys, partial_key(keys[-1] if keys else root, rest)] if rest else keys
