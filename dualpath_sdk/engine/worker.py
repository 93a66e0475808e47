"""What an engine process drives: a PE or DE worker behind one protocol, and the plumbing both share.

The process loop (engine/process.py) knows no role: it sends what `step` gives (one unit of work: a
prefill batch, a decode step), the `report` of the figures after it, then what `pull` gives (a PE's
`Fetch`), and hands each control message that came to `handle`, which looks its handler up by type;
`has_work` tells it whether to wait a little for those. Messages born on a worker's I/O threads (a
DE's `Admitted`, `Finished`) go out through the process's thread-safe send the moment they happen,
never through the loop.

Both workers own a host buffer (the PE buffer, the DE buffer) registered with the transport, admit
requests FIFO as it has slots for them (never blocking the loop, whose work frees the slots), and read
Full Blocks from storage into those slots on reader threads, counted in the node's read queue.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from dualpath_sdk.engine.messages import Cancel, Hello, Report, Role
from dualpath_sdk.engine.read_queue import ReadQueue
from dualpath_sdk.kv.block import FullBlock, KVLayout
from dualpath_sdk.kv.keys import BlockKey
from dualpath_sdk.model.loader import Model
from dualpath_sdk.store.backend import BlockStore
from dualpath_sdk.store.buffers import BufferSlot, HostBufferPool
from dualpath_sdk.transfer import Transport


@dataclass(frozen=True)
class Read:
    """A request's storage reads, done."""

    valid: int  # leading blocks read intact: a missing or corrupt block ends the usable prefix there
    seconds: float  # from queueing the reads to their end


@dataclass(frozen=True)
class _Waiting:
    """An admitted request waiting for `slots` buffer slots; `read_tokens` are already in the read queue."""

    req_id: str
    slots: int
    read_tokens: int
    start: Callable[[list[BufferSlot]], None]


class Worker(ABC):
    """One engine's role: a PE or a DE."""

    role: Role

    def __init__(
        self,
        engine_id: str,
        model: Model,
        layout: KVLayout,
        store: BlockStore,
        transport: Transport,
        buffer_slots: int,
    ) -> None:
        self.engine_id = engine_id
        self.model = model
        self.layout = layout
        self.store = store
        self.region = transport.allocate(
            f"{engine_id}-{self.role}-buffer", HostBufferPool.region_bytes(layout, buffer_slots)
        )
        name = f"{self.role.upper()} buffer"
        self.buffer = HostBufferPool(layout, buffer_slots, name, region=self.region.tensor)
        self.readers = ThreadPoolExecutor(2, thread_name_prefix=f"{self.role}-read")
        self.reads = ReadQueue()
        self.waiting: deque[_Waiting] = deque()  # admitted, waiting for buffer slots, in order
        self.handlers: dict[type, Callable[[Any], None]] = {Cancel: self._on_cancel}

    # ---- the protocol the process loop drives ------------------------------------------------

    def hello(self, node: str) -> Hello:
        """What the cluster learns of this engine as it connects (a role adds its own fields)."""
        return Hello(
            engine_id=self.engine_id,
            role=self.role,
            node=node,
            pid=os.getpid(),
            fingerprint=self.model.fingerprint,
            kv_dtype=self.layout.dtype_name,
            kv_bytes_per_token=self.layout.bytes_per_token,
        )

    def handle(self, message: object) -> None:
        """Act on one control message; a TypeError for one this role does not take."""
        handler = self.handlers.get(type(message))
        if handler is None:
            raise TypeError(f"unexpected {type(message).__name__}")
        handler(message)

    @property
    @abstractmethod
    def has_work(self) -> bool:
        """Whether `step` would do something now (else the loop waits a little for messages)."""

    @abstractmethod
    def step(self) -> Iterable[object]:
        """One unit of work, and the messages it produces (a generator's: each is sent as it is yielded)."""

    def report(self) -> Report:
        store = self.store.counters
        return Report(
            engine_id=self.engine_id,
            seq=self.num_requests,
            tokens=self.num_tokens,
            read_q=self.reads.tokens,
            free_tokens=self.free_tokens,
            read_tps=self.reads.rate,
            buffer_free=self.buffer.free,
            buffer_slots=self.buffer.capacity,
            store_reads=(store.hits, store.misses, store.corrupt),
        )

    def pull(self) -> Iterable[object]:
        """What asks the cluster for work, once the report is out and before the loop waits for messages
        (the paper's pull model: a PE keeps one `Fetch` outstanding; a DE is sent its work)."""
        return []

    def close(self) -> None:
        self.readers.shutdown(wait=True)
        self.region.close()

    # ---- load figures ------------------------------------------------------------------------

    @property
    @abstractmethod
    def num_requests(self) -> int: ...

    @property
    @abstractmethod
    def num_tokens(self) -> int: ...

    @property
    def free_tokens(self) -> int:
        """KV memory a new request can still get to decode in: none on a PE."""
        return 0

    # ---- admission and reads -------------------------------------------------------------------

    def queue(
        self, req_id: str, slots: int, read_tokens: int, start: Callable[[list[BufferSlot]], None]
    ) -> None:
        """Queue a request that needs `slots` buffer slots: `start` gets them once free, in order.
        Its `read_tokens` join the read queue now (the paper's read_q counts queued reads too)."""
        self.reads.add(read_tokens)
        self.waiting.append(_Waiting(req_id, slots, read_tokens, start))
        self.start_waiting()

    def start_waiting(self) -> None:
        """Start queued requests in order while the buffer has slots for them."""
        while self.waiting and self.waiting[0].slots <= self.buffer.free:
            waiting = self.waiting.popleft()
            waiting.start(self.buffer.acquire(waiting.slots) if waiting.slots else [])

    def unqueue(self, req_id: str) -> bool:
        """Drop `req_id` if it still waits for slots (its reads leave the read queue unread)."""
        waiting = next((w for w in self.waiting if w.req_id == req_id), None)
        if waiting is None:
            return False
        self.waiting.remove(waiting)
        self.reads.remove(waiting.read_tokens, read=False)
        return True

    def read_blocks(self, items: Sequence[tuple[BlockKey, FullBlock]], tokens: list[int]) -> Future[Read]:
        """Read Full Blocks into buffer slots on a reader thread (`tokens`: each one's token count,
        already in the read queue, which they leave as the read ends)."""
        queued = time.perf_counter()

        def read() -> Read:
            try:
                ok = self.store.read_many(items, tokens)
            finally:
                self.reads.remove(sum(tokens))
            valid = next((i for i, good in enumerate(ok) if not good), len(ok))
            return Read(valid, time.perf_counter() - queued)

        return self.readers.submit(read)

    @abstractmethod
    def cancel(self, req_id: str) -> None: ...

    def _on_cancel(self, message: Cancel) -> None:
        self.cancel(message.req_id)
