"""Block keys: the identity of a Full Block of KV, the same in every process, machine and restart.

key_i = H(key_{i-1} || token ids of block i), key_{-1} = H(namespace). H is BLAKE2b with a 128-bit
digest; token ids are hashed as little-endian uint32. Python's hash() is salted per process and
must never be used here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import numpy as np

KEY_BYTES = 16
LAYOUT_VERSION = 1

BlockKey = bytes


def _digest(*parts: bytes) -> BlockKey:
    h = hashlib.blake2b(digest_size=KEY_BYTES)
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


def block_keys(root: BlockKey, token_ids: Sequence[int], block_size: int) -> list[BlockKey]:
    """Keys of every complete block of `token_ids`; a trailing partial block has no key."""
    keys: list[BlockKey] = []
    parent = root
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = chain_key(parent, token_ids[start : start + block_size])
        keys.append(parent)
    return keys
