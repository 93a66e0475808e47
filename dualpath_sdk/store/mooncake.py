"""The `mooncake` backend: blocks as objects of a Mooncake Store (its master runs anywhere,
`mooncake_master` ships in the wheel). A partial block's object holds its packed rows only.

An object is the same 4096-byte header plus payload as an fs block file, moved as two buffers in one
call (header scratch + the caller's buffer), so reads land in the caller's buffer with no copy and
are verified the same way. Mooncake's own leases and memory-pressure eviction may drop an object at
any time (a miss, never a wrong answer); our pins, LRU order and capacity live in the same SQLite
index the fs backend uses, kept in `index_dir` and shared by the node's processes.
On TCP, unregistered buffers work; on RDMA a buffer must be registered first (`register`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dualpath_sdk.config import MooncakeConfig
from dualpath_sdk.errors import InvalidInput, StorageError
from dualpath_sdk.fsutil import make_private_dirs
from dualpath_sdk.kv.block import FullBlock, payload_checksum
from dualpath_sdk.kv.keys import BlockKey
from dualpath_sdk.store.aligned import aligned_empty, byte_view
from dualpath_sdk.store.backend import BlockStore
from dualpath_sdk.store.header import HEADER_BYTES, decode_header, encode_header
from dualpath_sdk.store.index import BlockIndex, Clock
from dualpath_sdk.store.limiter import StorageNicLimiter

INSTALL_HINT = "pip install mooncake-transfer-engine-non-cuda (and apt-get install libibverbs1)"


def master_binary() -> Path:
    """The `mooncake_master` executable shipped inside the wheel; StorageError when not installed."""
    try:
        import mooncake
    except ImportError as exc:
        raise StorageError(f"the mooncake backend needs {INSTALL_HINT}: {exc}") from exc
    path = Path(mooncake.__file__).parent / "mooncake_master"
    if not path.is_file():
        raise StorageError(f"{path} is missing from the mooncake wheel")
    return path


class MooncakeStore(BlockStore):
    """Full Blocks in a Mooncake Store; one client per process, with pins/LRU in a node-local index."""

    def __init__(
        self,
        config: MooncakeConfig,
        index_dir: Path,
        capacity_bytes: int | None = None,
        read_threads: int = 4,
        limiter: StorageNicLimiter | None = None,
        clock: Clock = time.time,
    ) -> None:
        try:
            from mooncake.store import MooncakeDistributedStore
        except ImportError as exc:  # the wheel, or the libibverbs1 it links against, is missing
            raise StorageError(f"the mooncake backend needs {INSTALL_HINT}: {exc}") from exc
        super().__init__(read_threads)
        self.capacity_bytes = capacity_bytes
        self.limiter = limiter
        self._client: Any = MooncakeDistributedStore()
        rc = self._client.setup(
            config.local_hostname,
            config.metadata_server,
            config.global_segment_bytes,
            config.local_buffer_bytes,
            config.protocol,
            config.device_name,
            config.master_address,
        )
        if rc != 0:
            raise StorageError(f"mooncake setup against master {config.master_address} failed: {rc}")
        make_private_dirs(Path(index_dir))
        self.index = BlockIndex(Path(index_dir) / "index.sqlite", clock)
        self._tls = threading.local()

    @staticmethod
    def _name(key: BlockKey) -> str:
        return f"dualpath/{key.hex()}"

    def _header_buf(self, count: int) -> list[torch.Tensor]:
        """This thread's `count` page-sized header buffers, reused across calls."""
        bufs: list[torch.Tensor] = getattr(self._tls, "headers", [])
        while len(bufs) < count:
            bufs.append(aligned_empty(HEADER_BYTES))
        self._tls.headers = bufs
        return bufs[:count]

    def register(self, region: torch.Tensor) -> None:
        """Register a long-lived buffer (a host buffer pool's region) for RDMA transfers."""
        if self._client.register_buffer(region.data_ptr(), region.numel() * region.element_size()) != 0:
            raise StorageError("mooncake could not register the buffer")

    def put(self, key: BlockKey, parent_key: BlockKey | None, token_count: int, block: FullBlock) -> None:
        if self.contains(key):
            self.index.touch([key])
            return
        payload = self._payload(block, token_count)
        nbytes = payload.numel()
        if self.capacity_bytes is not None:
            self._delete(self.index.take_victims(self.capacity_bytes, HEADER_BYTES + nbytes, strict=True))
        if self.limiter is not None:
            self.limiter.acquire_write(HEADER_BYTES + nbytes)
        (head,) = self._header_buf(1)
        header = encode_header(
            key, parent_key, token_count, block.layout.dtype_name, nbytes, payload_checksum(payload)
        )
        byte_view(head)[: len(header)] = header
        (rc,) = self._client.batch_put_from_multi_buffers(
            [self._name(key)], [[head.data_ptr(), payload.data_ptr()]], [[HEADER_BYTES, nbytes]]
        )
        if rc != 0:
            raise StorageError(f"mooncake put of block {key.hex()} failed: {rc}")
        self.index.add(key, HEADER_BYTES + nbytes)
        self.counters.add(bytes_written=nbytes)

    def get_into(self, key: BlockKey, block: FullBlock, tokens: int | None = None) -> bool:
        return self.read_many([(key, block)], None if tokens is None else [tokens])[0]

    def read_many(
        self, items: Sequence[tuple[BlockKey, FullBlock]], tokens: Sequence[int] | None = None
    ) -> list[bool]:
        """One batched call: Mooncake runs the transfers in parallel itself. A partial block's packed
        rows land at the start of its buffer and are unpacked there."""
        if not items:
            return []
        counts = self._token_counts(items, tokens)
        heads = self._header_buf(len(items))
        sizes = [
            [HEADER_BYTES, block.layout.packed_nbytes(n)] for (_, block), n in zip(items, counts, strict=True)
        ]
        if self.limiter is not None:
            self.limiter.acquire_read(sum(h + n for h, n in sizes))
        rcs = self._client.batch_get_into_multi_buffers(
            [self._name(k) for k, _ in items],
            [[h.data_ptr(), b.raw.data_ptr()] for h, (_, b) in zip(heads, items, strict=True)],
            sizes,
        )
        hits = [
            self._verify(k, b, n, h, rc) for (k, b), n, h, rc in zip(items, counts, heads, rcs, strict=True)
        ]
        self.index.touch([k for (k, _), hit in zip(items, hits, strict=True) if hit])
        return hits

    def _verify(self, key: BlockKey, block: FullBlock, tokens: int, head: torch.Tensor, rc: int) -> bool:
        nbytes = block.layout.packed_nbytes(tokens)
        if rc < 0:  # absent, evicted, or stored with another size (the buffers do not fit it)
            self.counters.add(misses=1)
            return False
        header = decode_header(byte_view(head))
        if (
            header is not None
            and header[0] == key
            and (header[4], header[3]) != (nbytes, block.layout.dtype_name)
        ):
            raise InvalidInput(f"block {key.hex()} holds {header[4]} bytes of {header[3]}; wrong KVLayout")
        if (
            header is None
            or header[0] != key
            or rc != HEADER_BYTES + nbytes
            or payload_checksum(block.raw[:nbytes]) != header[5]
        ):
            self._client.remove(self._name(key), True)  # nowhere to quarantine: drop it, count it
            self.index.remove(key)
            self.counters.add(misses=1, corrupt=1)
            return False
        if tokens < block.layout.block_size:
            block.unpack(tokens)
        self.counters.add(hits=1, bytes_read=nbytes)
        return True

    def contains(self, key: BlockKey) -> bool:
        return bool(self._client.is_exist(self._name(key)) == 1)

    def longest_prefix(self, keys: Sequence[BlockKey]) -> int:
        """One batched existence query instead of a round trip per key."""
        found = self._client.batch_is_exist([self._name(k) for k in keys]) if keys else []
        return next((i for i, rc in enumerate(found) if rc != 1), len(keys))

    def _delete(self, keys: Sequence[BlockKey]) -> None:
        if keys:
            self._client.batch_remove([self._name(k) for k in keys], True)
        self.counters.add(evicted=len(keys))

    def close(self) -> None:
        super().close()
        self._client.close()
        self.index.close()
