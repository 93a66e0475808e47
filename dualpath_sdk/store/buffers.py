"""Host buffer pools: a node's PE buffer and DE buffer (PAPER.md, "two load paths").

Each pool is one contiguous tensor cut into page-aligned Full Block slots, so storage reads land in
it with direct I/O and a transport can register it once as one memory region (slot i lives at byte
offset `i * slot_stride`). When the pool is full, allocation waits: the reader slows down instead of
failing (backpressure), and only a wait past its timeout raises. Pinned memory when CUDA is present,
so host-to-GPU copies can run asynchronously.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from dualpath_sdk.errors import BufferTimeout, InvalidInput
from dualpath_sdk.kv.block import FullBlock, KVLayout
from dualpath_sdk.store.aligned import aligned_empty, round_up


@dataclass(frozen=True)
class BufferSlot:
    """One Full Block slot of a pool: its index, byte offset in the pool's region, and its view."""

    index: int
    offset: int
    block: FullBlock


class HostBufferPool:
    """A fixed number of Full Block slots in one contiguous (pinned when CUDA is present) tensor."""

    def __init__(
        self,
        layout: KVLayout,
        slots: int,
        name: str = "buffer",
        pin_memory: bool | None = None,
        region: torch.Tensor | None = None,
    ) -> None:
        """`region`: memory to cut the slots from (a transport's registered region, so peers can
        write into the slots); by default the pool allocates its own."""
        if slots <= 0:
            raise InvalidInput(f"a host buffer needs at least one slot, got {slots}")
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()  # pin_memory=True raises without CUDA
        self.layout = layout
        self.name = name
        self.capacity = slots
        self.slot_stride = round_up(layout.full_block_nbytes)
        if region is None:
            region = aligned_empty(slots * self.slot_stride, pin_memory=pin_memory)
        elif region.dtype != torch.uint8 or region.numel() < slots * self.slot_stride:
            raise InvalidInput(f"{name}: the region holds fewer than {slots} slots")
        self.region = region
        nbytes = layout.full_block_nbytes
        self._slots = [
            BufferSlot(
                i, i * self.slot_stride, FullBlock(layout, self.region[i * self.slot_stride :][:nbytes])
            )
            for i in range(slots)
        ]
        self._free = list(range(slots - 1, -1, -1))
        self._cond = threading.Condition()

    @staticmethod
    def region_bytes(layout: KVLayout, slots: int) -> int:
        """The size of a region that holds `slots` slots (to allocate it from a transport)."""
        return slots * round_up(layout.full_block_nbytes)

    @property
    def free(self) -> int:
        with self._cond:
            return len(self._free)

    def acquire(self, count: int = 1, timeout: float | None = None) -> list[BufferSlot]:
        """Take `count` slots at once, waiting while fewer are free (all or none, so two waiters can
        never deadlock holding halves). Raises BufferTimeout after `timeout` seconds."""
        if not 0 < count <= self.capacity:
            raise InvalidInput(f"asked for {count} slots of {self.name}, which has {self.capacity}")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while len(self._free) < count:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise BufferTimeout(
                        f"{self.name}: {count} slots not free within {timeout} s ({len(self._free)} free)"
                    )
                self._cond.wait(left)
            return [self._slots[self._free.pop()] for _ in range(count)]

    def release(self, slots: list[BufferSlot]) -> None:
        with self._cond:
            taken = set(range(self.capacity)) - set(self._free)
            for slot in slots:
                if slot.index not in taken or self._slots[slot.index] is not slot:
                    raise InvalidInput(f"{self.name}: slot {slot.index} released twice or not from this pool")
                taken.discard(slot.index)
                self._free.append(slot.index)
            self._cond.notify_all()

    @contextmanager
    def lease(self, count: int = 1, timeout: float | None = None) -> Iterator[list[BufferSlot]]:
        """`acquire` for the length of a `with` block."""
        slots = self.acquire(count, timeout)
        try:
            yield slots
        finally:
            self.release(slots)


@dataclass(frozen=True)
class NodeBuffers:
    """A node's two host buffers: the PE buffer (PE read path) and the DE buffer (DE read path, and
    where every prompt's complete KV gathers before decoding)."""

    pe: HostBufferPool
    de: HostBufferPool

    @classmethod
    def create(
        cls, layout: KVLayout, pe_slots: int, de_slots: int, pin_memory: bool | None = None
    ) -> NodeBuffers:
        return cls(
            HostBufferPool(layout, pe_slots, "PE buffer", pin_memory),
            HostBufferPool(layout, de_slots, "DE buffer", pin_memory),
        )
