"""The storage-NIC limiter: one bandwidth cap per node on persistent reads and writes.

In the paper every node has one storage NIC, and the PE nodes' SNICs are the bottleneck. On one
machine we reproduce that by giving each simulated node a token bucket that every engine process of
that node shares: the bucket lives in a small file under /dev/shm, mmap'd by each process, and one
flock serialises its updates; the file is owner-only (0o600). Reads and writes have separate
buckets (a NIC is full duplex).

A request reserves its bytes at once and sleeps off any debt, so the granted rate over any window
is the set rate plus at most one burst, whatever the request sizes.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import re
import struct
import time
from collections.abc import Callable
from pathlib import Path

from dualpath_sdk.errors import InvalidInput
from dualpath_sdk.fsutil import PRIVATE_FILE

# Per direction: rate (bytes/s), tokens (bytes, may go negative = debt), last refill time, and the
# bytes granted since the file was made (capped or not: what the node's NIC has moved).
_BUCKET = struct.Struct("<dddd")
_READ, _WRITE = 0, _BUCKET.size
_SIZE = 2 * _BUCKET.size
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def open_node_state(path: Path, size: int, init: Callable[[mmap.mmap], None]) -> tuple[int, mmap.mmap]:
    """Open (creating) a state file that every process of a node maps, and run `init` on it under
    the file's lock. The emulated NICs (this limiter, transfer's PriorityLink) keep their buckets here."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        state = mmap.mmap(fd, size)
        init(state)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
    return fd, state


class StorageNicLimiter:
    """A per-node token bucket shared by every process that opens the same `node` name.

    `read_bps`/`write_bps` of None leave that direction unlimited. `burst_s` is how many seconds of
    rate an idle bucket may save up. The clock must be system-wide (CLOCK_MONOTONIC is on Linux).
    """

    def __init__(
        self,
        node: str,
        read_bps: float | None,
        write_bps: float | None = None,
        burst_s: float = 0.01,
        directory: Path = Path("/dev/shm"),
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not _NAME.match(node):
            raise InvalidInput(f"limiter node name {node!r} must match {_NAME.pattern}")
        for rate in (read_bps, write_bps):
            if rate is not None and rate <= 0:
                raise InvalidInput(f"a limiter rate must be positive or None, got {rate}")
        self.node = node
        self.burst_s = burst_s
        self.clock = clock
        self.sleep = sleep
        self.path = directory / f"dualpath-snic-{node}"

        def set_rates(state: mmap.mmap) -> None:
            # Every engine of a node has the same configuration: the latest opener sets the rates and
            # keeps the bucket's tokens, so a late opener does not forgive the others' debt.
            for offset, rate in ((_READ, read_bps), (_WRITE, write_bps)):
                _, tokens, last, total = _BUCKET.unpack_from(state, offset)
                _BUCKET.pack_into(state, offset, rate or 0.0, tokens, last, total)

        self._fd, self._map = open_node_state(self.path, _SIZE, set_rates)

    def acquire_read(self, nbytes: int) -> float:
        """Block until `nbytes` of read bandwidth is granted; returns the seconds waited."""
        return self._acquire(_READ, nbytes)

    def acquire_write(self, nbytes: int) -> float:
        """Block until `nbytes` of write bandwidth is granted; returns the seconds waited."""
        return self._acquire(_WRITE, nbytes)

    def _acquire(self, offset: int, nbytes: int) -> float:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            rate, tokens, last, total = _BUCKET.unpack_from(self._map, offset)
            if rate > 0:
                now = self.clock()
                tokens = min(rate * self.burst_s, tokens + (now - last) * rate) - nbytes
                _BUCKET.pack_into(self._map, offset, rate, tokens, now, total)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        wait = -tokens / rate if rate > 0 and tokens < 0 else 0.0
        if wait > 0:
            self.sleep(wait)
        self._count(offset, nbytes)  # once granted: monitors see the rate the cap lets through
        return wait

    def _count(self, offset: int, nbytes: int) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            rate, tokens, last, total = _BUCKET.unpack_from(self._map, offset)
            _BUCKET.pack_into(self._map, offset, rate, tokens, last, total + nbytes)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def granted(self) -> tuple[float, float]:
        """Bytes read and written through this node's NIC so far, by every process of the node."""
        return granted_bytes(self.node, self.path.parent)

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)

    def __enter__(self) -> StorageNicLimiter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def granted_bytes(node: str, directory: Path = Path("/dev/shm")) -> tuple[float, float]:
    """Bytes read and written through `node`'s storage NIC so far (0, 0 before any engine opened it).

    Reads the shared state without taking part in it: monitors sample it while engines run."""
    path = directory / f"dualpath-snic-{node}"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0.0, 0.0
    if len(data) < _SIZE:
        return 0.0, 0.0
    return _BUCKET.unpack_from(data, _READ)[3], _BUCKET.unpack_from(data, _WRITE)[3]
