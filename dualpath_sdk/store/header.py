"""The block header every backend stores in front of a block's payload (DESIGN.md, KV formats): a
Full Block's, or a partial block's packed rows (store/backend.py), as its token count says.

One page (4096 bytes) so the payload after it stays page-aligned for direct I/O.
"""

from __future__ import annotations

import struct

import xxhash

from dualpath_sdk.kv.keys import KEY_BYTES, BlockKey
from dualpath_sdk.store.aligned import ALIGN

FORMAT_VERSION = 1
MAGIC = b"DPKVBLK\0"
HEADER_BYTES = ALIGN
# magic, version, token count, key, parent key, dtype name, payload bytes, payload xxh3; then the
# xxh3 of those fields, so a flipped header bit is caught before its lengths are trusted.
_FIELDS = struct.Struct(f"<8sHxxI{KEY_BYTES}s{KEY_BYTES}s16sQQ")
_HEADER_SUM = struct.Struct("<Q")
_NO_PARENT = bytes(KEY_BYTES)


def encode_header(
    key: BlockKey, parent_key: BlockKey | None, token_count: int, dtype: str, nbytes: int, checksum: int
) -> bytes:
    fields = _FIELDS.pack(
        MAGIC, FORMAT_VERSION, token_count, key, parent_key or _NO_PARENT, dtype.encode(), nbytes, checksum
    )
    return fields + _HEADER_SUM.pack(xxhash.xxh3_64_intdigest(fields))


def decode_header(raw: bytes | memoryview) -> tuple[BlockKey, BlockKey | None, int, str, int, int] | None:
    """(key, parent key, token count, dtype, payload bytes, payload checksum), or None if damaged."""
    fields = bytes(raw[: _FIELDS.size])
    (stored_sum,) = _HEADER_SUM.unpack_from(raw, _FIELDS.size)
    if stored_sum != xxhash.xxh3_64_intdigest(fields):
        return None
    magic, version, tokens, key, parent, dtype, nbytes, checksum = _FIELDS.unpack(fields)
    if magic != MAGIC or version != FORMAT_VERSION:
        return None
    return (
        key,
        (None if parent == _NO_PARENT else parent),
        tokens,
        dtype.rstrip(b"\0").decode(),
        nbytes,
        checksum,
    )
