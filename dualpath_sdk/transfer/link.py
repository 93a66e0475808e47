"""An emulated compute-NIC link with two priority classes, shared by the processes of one node.

The paper puts model traffic in a high-priority lane and KV traffic in a low-priority one that still
takes all idle bandwidth (PAPER.md, Traffic isolation). On one machine we emulate that lane pair the
way the storage-NIC limiter (store/limiter.py) emulates a storage NIC: a token bucket in a small
mmap'd file under /dev/shm, updated under one flock by every process that opens the same node name.
Transfers pass through it chunk by chunk. A `model` chunk always reserves its bytes at once and
sleeps off any debt. A `kv` chunk reserves only when the link is idle: no debt left and no model
chunk within `grace_s`, so a model stream's short gaps between chunks are not stolen; it sleeps
until then otherwise. So model waits at most one kv chunk, and kv gets the whole link when alone.
Writes and reads have separate links (a NIC is full duplex).
"""

from __future__ import annotations

import fcntl
import math
import mmap
import os
import re
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from dualpath_sdk.errors import InvalidInput, TransferError
from dualpath_sdk.store.limiter import open_node_state

TrafficClass = Literal["model", "kv"]
Direction = Literal["write", "read"]

# Per direction: rate (bytes/s), tokens (bytes, negative = debt), last refill, model hold-until time.
_LINK = struct.Struct("<dddd")
_OFFSET = {"write": 0, "read": _LINK.size}
_SIZE = 2 * _LINK.size
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# A kv chunk goes once the debt left is under this many seconds (float rounding of the refill).
_IDLE_S = 1e-4


class PriorityLink:
    """One node's emulated link: `acquire` blocks a chunk until its class may send it."""

    def __init__(
        self,
        node: str,
        rate_bps: float,
        burst_s: float = 0.002,
        grace_s: float = 0.005,
        directory: Path = Path("/dev/shm"),
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not _NAME.match(node):
            raise InvalidInput(f"link node name {node!r} must match {_NAME.pattern}")
        if rate_bps <= 0:
            raise InvalidInput(f"a link rate must be positive, got {rate_bps}")
        self.node = node
        self.rate = rate_bps
        self.burst_s = burst_s
        self.grace_s = grace_s
        self.clock = clock
        self.sleep = sleep
        self.path = directory / f"dualpath-link-{node}"

        def set_rate(state: mmap.mmap) -> None:
            # As in the limiter: the latest opener sets the rate, and the bucket keeps its debt.
            for offset in _OFFSET.values():
                _, tokens, last, hold = _LINK.unpack_from(state, offset)
                _LINK.pack_into(state, offset, rate_bps, tokens, last, hold)

        self._fd, self._map = open_node_state(self.path, _SIZE, set_rate)

    def acquire(
        self, cls: TrafficClass, direction: Direction, nbytes: int, deadline: float = math.inf
    ) -> float:
        """Block until `nbytes` of `cls` may go; returns the seconds waited. A kv chunk still waiting
        at `deadline` (a `clock` time) raises TransferError."""
        waited = 0.0
        while True:
            wait, reserved = self._try(cls, _OFFSET[direction], nbytes)
            if not reserved and self.clock() + wait > deadline:
                raise TransferError(f"link {self.node}: a kv chunk waited past its deadline behind model")
            if wait > 0:
                self.sleep(wait)
                waited += wait
            if reserved:
                return waited

    def _try(self, cls: TrafficClass, offset: int, nbytes: int) -> tuple[float, bool]:
        """One locked look at the bucket: (seconds to sleep, whether the bytes were reserved)."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            rate, tokens, last, hold = _LINK.unpack_from(self._map, offset)
            now = self.clock()
            tokens = min(rate * self.burst_s, tokens + (now - last) * rate)
            debt_s = max(0.0, -tokens / rate)
            if cls == "kv" and (debt_s > _IDLE_S or now < hold):
                _LINK.pack_into(self._map, offset, rate, tokens, now, hold)
                return max(debt_s, hold - now), False
            tokens -= nbytes
            debt_s = max(0.0, -tokens / rate)
            if cls == "model":
                hold = max(hold, now + debt_s + self.grace_s)
            _LINK.pack_into(self._map, offset, rate, tokens, now, hold)
            return debt_s, True
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)
