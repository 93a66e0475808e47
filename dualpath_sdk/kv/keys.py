"""Block keys: the identity of a block of KV, the same in every process, machine and restart.

key_i = H(key_{i-1} || token ids of block i), key_{-1} = H(namespace). H is BLAKE2b with a 128-bit
digest; token ids are hashed as little-endian uint32. Python's hash() is salted per process and
must never be used here.

A partial block (the 1 .. block_size - 1 tokens after a sequence's last Full Block) has its own
key, `partial_key(key_{i-1}, tokens)` = H_p(key_{i-1} || len(tokens) || tokens), where H_p is
BLAKE2b personalised for partial blocks: a different hash function from H, so a partial key never
equals a Full Block's key, and it binds its token count and its tokens. A partial block is a leaf:
no key is ever chained onto it (the next Full Block at its position chains onto key_{i-1}).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import numpy as np

KEY_BYTES = 16
LAYOUT_VERSION = 1

BlockKey = bytes


_PARTIAL = b"dualpath-partial"  # BLAKE2b personalisation (16 bytes): partial keys' own hash function


def _digest(*parts: bytes, person: bytes = b"") -> BlockKey:
    h = hashlib.blake2b(digest_size=KEY_BYTES, person=person)
    for part in parts:
        h.update(part)
    return h.digest()


def namespace_key(
    model_fingerprint: str, kv_dtype: str, block_size: int, tenant: str = "default"
) -> BlockKey:
    """key_{-1}: everything that makes the same tokens produce different KV bytes, plus the tenant salt."""
    namespace = {
        "model": model_fingerprint,
        "kv_dtype": kv_dtype,
        "block_size": block_size,
        "layout": LAYOUT_VERSION,
        "tenant": tenant,
    }
    return _digest(b"dualpath-ns\0", json.dumps(namespace, sort_keys=True).encode())


def chain_key(parent: BlockKey, block_token_ids: Sequence[int]) -> BlockKey:
    """The key of one block given its parent's key."""
    return _digest(parent, np.asarray(block_token_ids, dtype="<u4").tobytes())


def partial_key(parent: BlockKey, token_ids: Sequence[int]) -> BlockKey:
    """The key of a partial block (fewer tokens than a block holds) whose chain parent is `parent`."""
    count = len(token_ids)
    if count == 0:
        raise ValueError("a partial block holds at least one token")
    tokens = np.asarray(token_ids, dtype="<u4").tobytes()
    return _digest(parent, count.to_bytes(4, "little"), tokens, person=_PARTIAL)


def block_keys(root: BlockKey, token_ids: Sequence[int], block_size: int) -> list[BlockKey]:
    """Keys of every complete block of `token_ids` (a trailing partial block's is `partial_key`)."""
    keys: list[BlockKey] = []
    parent = root
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = chain_key(parent, token_ids[start : start + block_size])
        keys.append(parent)
    return keys
