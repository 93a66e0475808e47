"""The persistent-store interface every backend implements (fs, mooncake).

Blocks are content-addressed by their chain key (kv/keys.py), so a key is written once and never
changes: a second put of the same key is a no-op. A read either fills the caller's buffer with the
verified block and returns True, or returns False (absent, evicted, corrupt): a miss means
recompute, never a wrong answer. The caller's buffer holds garbage after a False.

A block put with fewer tokens than the block size is a partial block (under its `partial_key`):
only its used rows are stored, packed (kv/block.py), and its header's token count says so; a read
unpacks it into the caller's Full Block buffer, the rows past its tokens zeroed. Partial blocks
are leaves the next turn supersedes with a Full Block; sessions pin their Full Blocks only, so
LRU eviction takes a partial block like any unpinned one (a lost one costs its tokens' recompute).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from dualpath_sdk.errors import InvalidInput
from dualpath_sdk.kv.block import FullBlock
from dualpath_sdk.kv.keys import BlockKey
from dualpath_sdk.store.aligned import aligned_empty
from dualpath_sdk.store.index import BlockIndex
from dualpath_sdk.store.shared_index import SharedIndex


@dataclass(frozen=True)
class StoreStats:
    """Counters of this store object (this process), plus what the shared index holds."""

    hits: int
    misses: int
    bytes_read: int
    bytes_written: int
    corrupt: int
    evicted: int
    blocks: int
    stored_bytes: int
    pinned_blocks: int


@dataclass
class Counters:
    """Thread-safe per-process counters behind StoreStats."""

    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    corrupt: int = 0
    evicted: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)


class BlockStore(ABC):
    """A persistent store of Full Blocks keyed by block key, with pins, a capacity and LRU eviction.

    Pins, recency and sizes live in an index (SQLite, shared by one host's processes, or the fs
    backend's files, shared by hosts); a backend stores and deletes the bytes.
    """

    index: BlockIndex | SharedIndex
    capacity_bytes: int | None

    def __init__(self, read_threads: int) -> None:
        self.counters = Counters()
        self._pool = ThreadPoolExecutor(max_workers=read_threads, thread_name_prefix="kv-read")

    @abstractmethod
    def put(self, key: BlockKey, parent_key: BlockKey | None, token_count: int, block: FullBlock) -> None:
        """Persist `block` under `key`; visible to readers only once complete. Raises StorageError.
        `token_count` below the block size: a partial block, whose first `token_count` rows are kept."""

    @abstractmethod
    def get_into(self, key: BlockKey, block: FullBlock, tokens: int | None = None) -> bool:
        """Read and verify `key` straight into `block`'s buffer; False on a miss or a corrupt block.
        `tokens`: the tokens the stored block holds, fewer for a partial block (None: a Full Block)."""

    @abstractmethod
    def contains(self, key: BlockKey) -> bool:
        """Whether `key` is stored (a later read may still miss if it is evicted or corrupt)."""

    def pin(self, owner: str, keys: Sequence[BlockKey], ttl_s: float) -> int:
        """Protect `keys` from eviction for `ttl_s` on behalf of `owner` (a session); pinning again extends
        it. Returns how many of the keys are stored and now pinned."""
        return self.index.pin(owner, keys, ttl_s)

    def unpin(self, owner: str, keys: Sequence[BlockKey] | None = None) -> None:
        """Drop `owner`'s pins on `keys` (all of them when None)."""
        self.index.unpin(owner, keys)

    def evict_to_capacity(self) -> int:
        """Evict unpinned blocks, least recently used first, until under capacity; returns how many."""
        if self.capacity_bytes is None:
            return 0
        victims = self.index.take_victims(self.capacity_bytes)
        self._delete(victims)
        return len(victims)

    @abstractmethod
    def _delete(self, keys: Sequence[BlockKey]) -> None:
        """Remove the stored bytes of `keys` (the index has already let go of them)."""

    @staticmethod
    def _payload(block: FullBlock, token_count: int) -> torch.Tensor:
        """The bytes `put` stores: the whole Full Block, or a partial block's rows packed (page-aligned,
        so direct I/O can write them)."""
        layout = block.layout
        if not 0 < token_count <= layout.block_size:
            raise InvalidInput(f"a block holds 1 to {layout.block_size} tokens, not {token_count}")
        if token_count == layout.block_size:
            return block.raw
        return block.pack(token_count, aligned_empty(layout.packed_nbytes(token_count)))

    @staticmethod
    def _tokens_of(block: FullBlock, tokens: int | None) -> int:
        """The token count a read expects (checked: 1 to the block size; None: a Full Block)."""
        layout = block.layout
        count = layout.block_size if tokens is None else tokens
        if not 0 < count <= layout.block_size:
            raise InvalidInput(f"a block holds 1 to {layout.block_size} tokens, not {count}")
        return count

    @classmethod
    def _token_counts(
        cls, items: Sequence[tuple[BlockKey, FullBlock]], tokens: Sequence[int] | None
    ) -> list[int]:
        """`_tokens_of` for each of many reads."""
        if tokens is not None and len(tokens) != len(items):
            raise InvalidInput(f"{len(tokens)} token counts for {len(items)} blocks")
        counts = tokens if tokens is not None else [None] * len(items)
        return [cls._tokens_of(block, n) for (_, block), n in zip(items, counts, strict=True)]

    def _totals(self) -> tuple[int, int, int]:
        """(blocks, stored bytes, pinned blocks)."""
        t = self.index.totals()
        return t.blocks, t.nbytes, t.pinned_blocks

    def read_many(
        self, items: Sequence[tuple[BlockKey, FullBlock]], tokens: Sequence[int] | None = None
    ) -> list[bool]:
        """Read many blocks in parallel, each into its own buffer; one bool per item. `tokens`: each
        block's token count (a partial block's is below the block size); None: all Full Blocks."""
        keys, blocks = [k for k, _ in items], [b for _, b in items]
        return list(self._pool.map(self.get_into, keys, blocks, self._token_counts(items, tokens)))

    def longest_prefix(self, keys: Sequence[BlockKey]) -> int:
        """How many leading keys are stored: the cached prefix in whole blocks (chain keys make a
        stored block imply nothing about its successors, so walk until the first absent one)."""
        for i, key in enumerate(keys):
            if not self.contains(key):
                return i
        return len(keys)

    def stats(self) -> StoreStats:
        c = self.counters
        blocks, stored, pinned = self._totals()
        return StoreStats(
            c.hits, c.misses, c.bytes_read, c.bytes_written, c.corrupt, c.evicted, blocks, stored, pinned
        )

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> BlockStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
