"""The `fs` backend: one file per block in a sharded directory (local disk or a DFS mount).

File = a 4096-byte header + the payload padded to 4096 bytes, so the payload lands page-aligned and
a whole block moves in one preadv, with O_DIRECT where the file system allows it (a partial
block's payload is its packed rows, store/backend.py: a shorter file). A block becomes visible
only when complete: written to tmp/, fsynced, renamed into blocks/<first key byte>/, that
directory fsynced. The 256 shard directories are made (and made durable) once, when a store opens.
Files are the truth for presence; the index holds sizes, LRU order and pins: SQLite (index.py), shared
by one host's processes, or files only (shared_index.py) for a directory several hosts mount (cluster
mode). Everything the store creates is owner-only (dualpath_sdk/fsutil.py: directories 0o700, files
0o600). The index is written after the rename, so a crash in between leaves a block only eviction
does not see; `_recover` re-adds such blocks when the index itself is lost.
A block write that would leave the file system with less than `reserve_bytes` free is refused
(StorageError, ENOSPC) before it starts: the headroom keeps session manifests and the index
writable on a full disk, so steps go on (their blocks recomputed later) until space returns.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch

from dualpath_sdk.errors import InvalidInput, StorageError
from dualpath_sdk.fsutil import PRIVATE_FILE, make_private_dirs
from dualpath_sdk.kv.block import FullBlock, payload_checksum
from dualpath_sdk.kv.keys import BlockKey
from dualpath_sdk.store.aligned import ALIGN, aligned_empty, byte_view, round_up
from dualpath_sdk.store.backend import BlockStore
from dualpath_sdk.store.header import HEADER_BYTES, decode_header, encode_header
from dualpath_sdk.store.index import BlockIndex, Clock
from dualpath_sdk.store.limiter import StorageNicLimiter
from dualpath_sdk.store.shared_index import SharedIndex

_O_DIRECT = getattr(os, "O_DIRECT", 0)
log = logging.getLogger(__name__)


class FsStore(BlockStore):
    """Full Blocks as files under `root`, shared by every process that opens the same root."""

    def __init__(
        self,
        root: Path,
        capacity_bytes: int | None = None,
        read_threads: int = 16,
        direct_io: bool = True,
        limiter: StorageNicLimiter | None = None,
        index_journal: str = "WAL",
        clock: Clock = time.time,
        reserve_bytes: int = 0,
        index: Literal["sqlite", "shared"] = "sqlite",
    ) -> None:
        """`index`: "sqlite" (one host's processes) or "shared" (hosts sharing `root`: shared_index.py)."""
        super().__init__(read_threads)
        self.root = Path(root)
        self.capacity_bytes = capacity_bytes
        self.limiter = limiter
        self.reserve_bytes = reserve_bytes
        self._direct = direct_io and _O_DIRECT != 0
        self._tls = threading.local()
        self._host = socket.gethostname()
        for sub in ("tmp", "quarantine", *(f"blocks/{i:02x}" for i in range(256))):
            make_private_dirs(self.root / sub)
        _fsync_dir(self.root / "blocks")
        _fsync_dir(self.root)
        self.shared = index == "shared"
        if self.shared:
            self.index: BlockIndex | SharedIndex = SharedIndex(self.root, self.path_of, clock)
            self.index.recover(_alive)
            self._recover(False)
        else:
            index_path = self.root / "index.sqlite"
            fresh_index = not index_path.exists()
            self.index = BlockIndex(index_path, clock, index_journal)
            self._recover(fresh_index)

    # -- layout -------------------------------------------------------------------------------------
    def path_of(self, key: BlockKey) -> Path:
        h = key.hex()
        return self.root / "blocks" / h[:2] / f"{h}.kv"

    def _scratch(self) -> memoryview:
        """This thread's aligned header + tail buffer (2 pages), reused across I/Os."""
        buf = getattr(self._tls, "buf", None)
        if buf is None:
            buf = self._tls.buf = byte_view(aligned_empty(2 * ALIGN))
        return buf

    def _open(self, path: Path, flags: int, direct: bool) -> tuple[int, bool]:
        """Open with O_DIRECT when asked and allowed; a file system that refuses it (tmpfs) turns it off."""
        if direct and self._direct:
            try:
                return os.open(path, flags | _O_DIRECT, PRIVATE_FILE), True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._direct = False
        return os.open(path, flags, PRIVATE_FILE), False

    # -- write --------------------------------------------------------------------------------------
    def put(self, key: BlockKey, parent_key: BlockKey | None, token_count: int, block: FullBlock) -> None:
        final = self.path_of(key)
        if final.exists():  # content-addressed: the same key is the same bytes
            self.index.touch([key])
            return
        raw = self._payload(block, token_count)
        nbytes = raw.numel()
        file_bytes = HEADER_BYTES + round_up(nbytes)
        if self.capacity_bytes is not None:
            self._delete(self.index.take_victims(self.capacity_bytes, file_bytes, strict=True))
        self._check_space(key, file_bytes)
        if self.limiter is not None:
            self.limiter.acquire_write(file_bytes)
        header = encode_header(
            key, parent_key, token_count, block.layout.dtype_name, nbytes, payload_checksum(raw)
        )
        tmp = self.root / "tmp" / f"{self._host}-{os.getpid()}-{uuid.uuid4().hex}.tmp"
        try:
            self._write_file(tmp, header, raw, file_bytes)
            os.rename(tmp, final)
            _fsync_dir(final.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"writing block {key.hex()} to {self.root}: {exc}") from exc
        self.index.add(key, file_bytes)
        self.counters.add(bytes_written=nbytes)

    def _check_space(self, key: BlockKey, file_bytes: int) -> None:
        try:
            st = os.statvfs(self.root)
        except OSError as exc:
            raise StorageError(f"writing block {key.hex()} to {self.root}: {exc}") from exc
        free = st.f_bavail * st.f_frsize
        if free - file_bytes < self.reserve_bytes:
            cause = OSError(errno.ENOSPC, f"{free} bytes free, {self.reserve_bytes} kept in reserve")
            raise StorageError(f"writing block {key.hex()} to {self.root}: {cause}") from cause

    def _write_file(self, tmp: Path, header: bytes, raw: torch.Tensor, file_bytes: int) -> None:
        nbytes = raw.numel()
        payload = byte_view(raw)
        scratch = self._scratch()
        head, tail = scratch[:ALIGN], scratch[ALIGN:]
        head[: len(header)] = header
        head[len(header) :] = bytes(ALIGN - len(header))
        fd, direct = self._open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, raw.data_ptr() % ALIGN == 0)
        try:
            if direct:
                main = nbytes // ALIGN * ALIGN
                buffers = [head, payload[:main]]
                if main < nbytes:
                    tail[: nbytes - main] = payload[main:]
                    tail[nbytes - main :] = bytes(ALIGN - (nbytes - main))
                    buffers.append(tail)
            else:
                buffers = [head, payload, memoryview(bytes(file_bytes - HEADER_BYTES - nbytes))]
            written = os.pwritev(fd, buffers, 0)
            if written != file_bytes:
                raise OSError(errno.ENOSPC, f"short write: {written} of {file_bytes} bytes")
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- read ---------------------------------------------------------------------------------------
    def get_into(self, key: BlockKey, block: FullBlock, tokens: int | None = None) -> bool:
        hit = self._read(key, block, self._tokens_of(block, tokens))
        if hit:
            self._touch([key])
        return hit

    def read_many(
        self, items: Sequence[tuple[BlockKey, FullBlock]], tokens: Sequence[int] | None = None
    ) -> list[bool]:
        counts = self._token_counts(items, tokens)
        hits = list(self._pool.map(self._read, [k for k, _ in items], [b for _, b in items], counts))
        self._touch([key for (key, _), hit in zip(items, hits, strict=True) if hit])
        return hits

    def _touch(self, keys: list[BlockKey]) -> None:
        """Refresh LRU order; a read that succeeded must not fail because bookkeeping did (disk full)."""
        try:
            self.index.touch(keys)
        except StorageError as exc:
            log.warning("LRU update skipped: %s", exc)

    def _read(self, key: BlockKey, block: FullBlock, tokens: int) -> bool:
        """Read a block of `tokens` tokens: a Full Block straight into the buffer, or a partial block's
        packed rows into its start, then unpacked in place."""
        path = self.path_of(key)
        raw = block.raw
        nbytes = block.layout.packed_nbytes(tokens)
        try:
            fd, direct = self._open(path, os.O_RDONLY, raw.data_ptr() % ALIGN == 0)
        except FileNotFoundError:
            self.counters.add(misses=1)
            return False
        try:
            if self.limiter is not None:
                self.limiter.acquire_read(HEADER_BYTES + round_up(nbytes))
            payload = byte_view(raw)
            scratch = self._scratch()
            head, tail = scratch[:ALIGN], scratch[ALIGN:]
            main = nbytes // ALIGN * ALIGN if direct else nbytes
            buffers = [head, payload[:main]] + ([tail] if main < nbytes else [])
            got = os.preadv(fd, buffers, 0)
        except OSError as exc:
            if exc.errno == errno.ESTALE:  # evicted by another host while open (NFS): a miss
                self.counters.add(misses=1)
                return False
            raise StorageError(f"reading block {key.hex()} from {self.root}: {exc}") from exc
        finally:
            os.close(fd)
        header = decode_header(head) if got >= HEADER_BYTES else None
        if header is not None:
            hkey, _, stored_tokens, dtype, stored_nbytes, _ = header
            if hkey == key and (stored_nbytes, dtype) != (nbytes, block.layout.dtype_name):
                raise InvalidInput(
                    f"block {key.hex()} holds {stored_nbytes} bytes of {dtype} ({stored_tokens} tokens); "
                    f"the read expects {nbytes} bytes of {block.layout.dtype_name} ({tokens} tokens): "
                    "wrong KVLayout for this namespace"
                )
        if header is None or header[0] != key or got < HEADER_BYTES + nbytes:
            return self._quarantine(key, path)
        if main < nbytes:
            payload[main:nbytes] = tail[: nbytes - main]
        if payload_checksum(raw[:nbytes]) != header[5]:
            return self._quarantine(key, path)
        if tokens < block.layout.block_size:
            block.unpack(tokens)
        self.counters.add(hits=1, bytes_read=nbytes)
        return True

    def _quarantine(self, key: BlockKey, path: Path) -> bool:
        """Move a damaged block aside (kept for inspection), forget it, and report a miss."""
        target = self.root / "quarantine" / f"{key.hex()}-{time.time_ns()}.kv"
        with contextlib.suppress(FileNotFoundError):  # another reader quarantined it first
            os.rename(path, target)
        self.index.remove(key)
        self.counters.add(misses=1, corrupt=1)
        return False

    # -- presence, pins, eviction --------------------------------------------------------------------
    def contains(self, key: BlockKey) -> bool:
        return self.path_of(key).exists()

    def _delete(self, keys: Sequence[BlockKey]) -> None:
        if not self.shared:  # the shared index deleted them itself (rename, pin re-check, unlink)
            for key in keys:
                self.path_of(key).unlink(missing_ok=True)
        self.counters.add(evicted=len(keys))

    def _recover(self, fresh_index: bool) -> None:
        """Remove temp files of dead writers on this host; re-index the blocks if the index was lost."""
        prefix = f"{self._host}-"
        for tmp in (self.root / "tmp").iterdir():
            if tmp.name.startswith(prefix) and not _alive(int(tmp.name[len(prefix) :].split("-")[0])):
                tmp.unlink(missing_ok=True)
        if fresh_index:
            for path in (self.root / "blocks").glob("*/*.kv"):
                self.index.add(bytes.fromhex(path.stem), path.stat().st_size)

    def close(self) -> None:
        super().close()
        self.index.close()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
