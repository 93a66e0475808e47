"""The one-sided transport interface (DESIGN.md, Transports): regions, write/read, completions.

A process registers memory as a Region and hands its picklable RegionDescriptor to peers; a peer
attaches it as a RemoteRegion and moves bytes between its own Region and the remote one without the
owner taking part, as with RDMA. Ops run on one worker thread per traffic class and direction, so a
queued kv op never holds up a model op of the same process, and reads never wait behind writes (a NIC
is full duplex; a memcpy backend runs unshaped ops in the caller); on
an emulated link (`link_bps`) they go chunk by chunk through the node's PriorityLink.
Implementations supply only the byte movement.
"""

from __future__ import annotations

import math
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from dualpath_sdk.config import TransferConfig
from dualpath_sdk.errors import InvalidInput, TransferError
from dualpath_sdk.transfer.link import Direction, PriorityLink, TrafficClass

Backend = Literal["local", "mooncake"]
CLASSES: tuple[TrafficClass, ...] = ("model", "kv")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class RegionDescriptor:
    """What a peer needs to attach a region: picklable, small, meaningful on the owner's host."""

    backend: Backend
    name: str
    nbytes: int
    endpoint: str  # local: the shared-memory file; mooncake: the owner engine's "host:port"
    address: int  # mooncake: the region's address in the owner; local: 0
    owner_pid: int
    owner_start: int  # the owner's start time (clock ticks since boot): tells a reused pid apart


class Region:
    """Memory this process registered: `tensor` is its bytes (contiguous uint8), `descriptor` lets
    peers attach it. `close` deregisters it; peers' later transfers to it fail."""

    def __init__(self, tensor: torch.Tensor, descriptor: RegionDescriptor) -> None:
        self.tensor = tensor
        self.descriptor = descriptor

    @property
    def name(self) -> str:
        return self.descriptor.name

    @property
    def nbytes(self) -> int:
        return self.descriptor.nbytes

    def close(self) -> None:
        """Deregister; implementations release their memory or registration."""


class RemoteRegion:
    """A peer's region, attached: the target of writes and the source of reads."""

    def __init__(self, descriptor: RegionDescriptor) -> None:
        self.descriptor = descriptor

    @property
    def nbytes(self) -> int:
        return self.descriptor.nbytes

    def close(self) -> None:
        """Detach; implementations drop their mapping."""


@dataclass(frozen=True)
class TransferOp:
    """One contiguous piece: `nbytes` at `local_offset` of a local region <-> `remote_offset` of a
    remote one (a Layer Block, or a chunk of one op on an emulated link)."""

    local: Region
    local_offset: int
    remote: RemoteRegion
    remote_offset: int
    nbytes: int


class Completion:
    """The handle of a submitted op: `wait` returns once the bytes are in place at the destination,
    or raises TransferError (failure, peer gone, or timeout; a timed-out op is cancelled)."""

    def __init__(
        self,
        what: str,
        future: Future[None] | None = None,
        cancel: threading.Event | None = None,
        deadline: float = 0.0,
        error: Exception | None = None,
    ) -> None:
        """A running op (`future`, `cancel`, `deadline`), or one already finished (future None:
        `error` or success), which skips a Future's locks on the memcpy fast path."""
        self._what = what
        self._future = future
        self._cancel = cancel
        self._deadline = deadline
        self._error = error

    def done(self) -> bool:
        return self._future is None or self._future.done()

    def wait(self, timeout: float | None = None) -> None:
        """Wait at most `timeout` seconds (None: until the op's own deadline, `timeout_s` after submit)."""
        if timeout is None:
            timeout = max(0.0, self._deadline - time.monotonic()) + 1.0
        try:
            if self._future is not None:
                self._future.result(timeout)
            elif self._error is not None:
                raise self._error
        except FutureTimeout:
            if self._cancel is not None:
                self._cancel.set()
            raise TransferError(f"{self._what} did not complete within {timeout:.3g} s") from None
        except TransferError:
            raise
        except Exception as exc:  # a backend or OS failure: still one kind for the caller
            raise TransferError(f"{self._what} failed: {exc}") from exc


class Transport(ABC):
    """register/allocate -> attach -> write/read (batched) -> Completion, with two traffic classes.

    `node` names this process's emulated node: every transport opened with the same node shares one
    link (only when `config.link_bps` is set).
    """

    backend: ClassVar[Backend]
    # Move unshaped ops in the caller's thread: for a backend whose move is a memcpy, handing a
    # Layer Block to a worker thread costs more than copying it.
    inline: ClassVar[bool] = False

    def __init__(self, config: TransferConfig, node: str = "node0") -> None:
        self.config = config
        self.link = (
            PriorityLink(node, config.link_bps, config.link_burst_s, config.model_grace_s, config.shm_dir)
            if config.link_bps is not None
            else None
        )
        self._workers = {
            (cls, direction): ThreadPoolExecutor(1, thread_name_prefix=f"transfer-{cls}-{direction}")
            for cls in CLASSES
            for direction in ("read", "write")
        }

    @abstractmethod
    def allocate(self, name: str, nbytes: int) -> Region:
        """A new zeroed region of `nbytes` that peers can attach."""

    @abstractmethod
    def register(self, name: str, tensor: torch.Tensor) -> Region:
        """Make an existing contiguous CPU tensor a region (no copy), where the backend can."""

    @abstractmethod
    def attach(self, descriptor: RegionDescriptor) -> RemoteRegion:
        """A peer's region, from the descriptor the peer handed over."""

    @abstractmethod
    def _move(self, direction: Direction, ops: Sequence[TransferOp]) -> None:
        """Move the bytes of `ops` (write: local -> remote; read: remote -> local) before returning;
        raise TransferError when the peer is gone."""

    def write(
        self,
        local: Region,
        local_offset: int,
        remote: RemoteRegion,
        remote_offset: int,
        nbytes: int,
        cls: TrafficClass = "kv",
    ) -> Completion:
        """Push `nbytes` of `local` at `local_offset` into `remote` at `remote_offset`."""
        return self.write_batch([TransferOp(local, local_offset, remote, remote_offset, nbytes)], cls)

    def read(
        self,
        local: Region,
        local_offset: int,
        remote: RemoteRegion,
        remote_offset: int,
        nbytes: int,
        cls: TrafficClass = "kv",
    ) -> Completion:
        """Pull `nbytes` of `remote` at `remote_offset` into `local` at `local_offset`."""
        return self.read_batch([TransferOp(local, local_offset, remote, remote_offset, nbytes)], cls)

    def write_batch(self, ops: Sequence[TransferOp], cls: TrafficClass = "kv") -> Completion:
        """All of `ops` as one submission and one completion (e.g. one layer's Layer Blocks)."""
        return self._submit("write", ops, cls)

    def read_batch(self, ops: Sequence[TransferOp], cls: TrafficClass = "kv") -> Completion:
        return self._submit("read", ops, cls)

    def _submit(self, direction: Direction, ops: Sequence[TransferOp], cls: TrafficClass) -> Completion:
        if cls not in CLASSES:
            raise InvalidInput(f"traffic class must be one of {CLASSES}, got {cls!r}")
        ops = list(ops)
        for op in ops:
            _check_bounds(op)
        what = f"{cls} {direction} of {len(ops)} pieces"
        if self.link is None and (started := self._begin(direction, ops, what)) is not None:
            return started
        deadline = time.monotonic() + self.config.timeout_s
        cancel = threading.Event()
        future = self._workers[cls, direction].submit(self._run, direction, ops, cls, deadline, cancel)
        return Completion(what, future, cancel, deadline)

    def _begin(self, direction: Direction, ops: list[TransferOp], what: str) -> Completion | None:
        """Unshaped ops: start them from the caller's thread and return their completion, or None to
        hand them to the worker of their class and direction. An `inline` backend moves them here."""
        if not self.inline:
            return None
        try:
            self._move(direction, ops)
        except Exception as exc:  # reported by wait(), like a worker's failure
            return Completion(what, error=exc)
        return Completion(what)

    def _run(
        self,
        direction: Direction,
        ops: list[TransferOp],
        cls: TrafficClass,
        deadline: float,
        cancel: threading.Event,
    ) -> None:
        if self.link is None:
            self._move(direction, ops)
            return
        for chunk in _chunks(ops, self.config.chunk_bytes):
            if cancel.is_set() or time.monotonic() > deadline:
                raise TransferError(f"{cls} {direction} cancelled or past its deadline")
            self.link.acquire(cls, direction, chunk.nbytes, deadline if cls == "kv" else math.inf)
            self._move(direction, [chunk])

    def close(self) -> None:
        """Stop the workers (queued ops finish first) and leave the link."""
        for worker in self._workers.values():
            worker.shutdown(wait=True)
        if self.link is not None:
            self.link.close()

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_name(name: str) -> None:
    if not _NAME.match(name):
        raise InvalidInput(f"region name {name!r} must match {_NAME.pattern}")


def region_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous CPU tensor as a flat uint8 view (no copy)."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise InvalidInput("a region must be a contiguous CPU tensor")
    return tensor.view(-1).view(torch.uint8)


def _check_bounds(op: TransferOp) -> None:
    if op.nbytes <= 0 or op.local_offset < 0 or op.remote_offset < 0:
        raise InvalidInput(f"a transfer needs a positive size and offsets >= 0: {op}")
    if op.local_offset + op.nbytes > op.local.nbytes or op.remote_offset + op.nbytes > op.remote.nbytes:
        raise InvalidInput(
            f"{op.nbytes} bytes at local {op.local_offset} / remote {op.remote_offset} overrun a region "
            f"({op.local.nbytes} / {op.remote.nbytes} bytes)"
        )


def _chunks(ops: Sequence[TransferOp], chunk_bytes: int) -> Iterator[TransferOp]:
    """Each op cut into pieces of at most `chunk_bytes`: the unit the link schedules."""
    for op in ops:
        for start in range(0, op.nbytes, chunk_bytes):
            n = min(chunk_bytes, op.nbytes - start)
            yield TransferOp(op.local, op.local_offset + start, op.remote, op.remote_offset + start, n)
