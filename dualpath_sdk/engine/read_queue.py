"""An engine's storage read queue: the paper's `read_q`, and the rate the node's SNIC drains it at."""

from __future__ import annotations

import threading
import time


class ReadQueue:
    """Tokens of Full Block reads queued or in flight, and tokens/s measured while reads were running.

    The rate divides the tokens read by the time at least one read was in flight, so idle periods do
    not dilute it and concurrent reads are not double-counted: it is the node's drain rate.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queued = 0
        self._done = 0
        self._busy_s = 0.0
        self._since = 0.0

    @property
    def tokens(self) -> int:
        return self._queued

    @property
    def rate(self) -> float:
        """Tokens per second while reading; 0.0 until a read has completed."""
        with self._lock:
            return self._done / self._busy_s if self._busy_s > 0 else 0.0

    def add(self, tokens: int) -> None:
        """`tokens` join the queue (a read is waiting for a reader thread or running)."""
        if tokens <= 0:
            return
        with self._lock:
            if self._queued == 0:
                self._since = time.perf_counter()
            self._queued += tokens

    def remove(self, tokens: int, read: bool = True) -> None:
        """`tokens` leave the queue; `read`: they were read (else dropped, and not counted in the rate)."""
        if tokens <= 0:
            return
        with self._lock:
            self._queued -= tokens
            self._done += tokens if read else 0
            if self._queued == 0:
                self._busy_s += time.perf_counter() - self._since
