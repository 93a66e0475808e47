"""The `mooncake` transport: Mooncake Transfer Engine, TCP on these machines, RDMA on clusters.

Each transport owns one TransferEngine started with P2P handshake (no metadata server): a peer is
addressed by its engine's "host:rpc_port", and a region by its address inside that engine, so a
descriptor carries both. Regions are registered memory (register_memory), so writes and reads are
one-sided and zero-copy on RDMA.

Ops go to the engine's async API from the caller's thread as they are submitted, so successive
submissions are in flight together, as on an RDMA queue pair; the thread that waits polls their
status, sleeping between polls. The engine's blocking calls spin on the status instead, which
takes a core from the engine's own I/O thread on a small host (mooncake write throughput roughly
doubled on 2 cores). Each op is its own engine batch: the engine's non-blocking status check sees
only a batch's first op. On an emulated link ops still go chunk by chunk through the base's
workers.

Completion means the bytes are in the peer's memory: Mooncake's TCP protocol v2 acknowledges a
WRITE only after the receiver applied its last chunk (tcp_transport_session_impl.h,
ServerSession::readBody). MC_TCP_PROTO=1 forces the legacy framing, which completes a WRITE once
its last chunk is in the sender's socket buffer, so the transport refuses to start under it.
On RDMA the whole process's traffic through this engine is KV traffic: `kv_service_level` and
`kv_traffic_class` become Mooncake's MC_IB_SL / MC_IB_TC before the engine starts (Mooncake reads
them once per process); model traffic (collectives) keeps its own lane. TCP ignores both.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from itertools import islice
from typing import Any, ClassVar

import torch

from dualpath_sdk.config import TransferConfig
from dualpath_sdk.errors import InvalidInput, TransferError
from dualpath_sdk.store.aligned import aligned_empty
from dualpath_sdk.transfer.base import (
    Backend,
    Completion,
    Region,
    RegionDescriptor,
    RemoteRegion,
    TransferOp,
    Transport,
    check_name,
    region_tensor,
)
from dualpath_sdk.transfer.link import Direction
from dualpath_sdk.transfer.local import process_start

INSTALL_HINT = "pip install mooncake-transfer-engine-non-cuda (and apt-get install libibverbs1)"
_NO_BATCH = (0, 2**64 - 1)  # what the engine's async submit returns when it could not submit
# Ops one transport keeps in the engine at once. Mooncake's TCP transport queues 1024 per peer, holds
# 1024 more for a second and fails the rest (3000 single-op batches at once: 531 failed), and after
# such an overflow it has lost ops outright; a few hundred keep every connection busy.
_DEPTH = 256
_RETIRE_SCAN = 32  # oldest ops checked per try when there is no room
# The sleep between status checks: short at first (timer slack stretches it to tens of microseconds;
# a lone 96 KiB write then completes as fast as under the engine's spinning wait), doubling while
# nothing completes (a check costs a few microseconds of a core; a late one adds latency).
_NAP_MIN_S = 10e-6
_NAP_MAX_S = 400e-6


class _EngineCompletion(Completion):
    """Ops in the engine, one batch per op, polled by the thread that waits: the engine settles
    them on its own I/O thread and offers no callback, and a poll costs a status call, so no other
    thread wakes for them. A failed op settles the whole submission at once."""

    def __init__(self, what: str, inflight: _InFlight, deadline: float) -> None:
        super().__init__(what, deadline=deadline)
        self._inflight = inflight
        self.moving: list[int] = []  # its batches the engine has not finished, oldest first

    def done(self) -> bool:
        return self._inflight.poll(self)

    def wait(self, timeout: float | None = None) -> None:
        """Wait at most `timeout` seconds (None: until the op's deadline, `timeout_s` after submit);
        a timed-out op is abandoned, and later waits raise at once."""
        limit = self._deadline if timeout is None else time.monotonic() + timeout
        nap = _NAP_MIN_S
        while not self._inflight.poll(self):
            if time.monotonic() > limit:
                self._inflight.abandon(self, "did not complete in time")
                break
            time.sleep(nap)
            nap = min(2 * nap, _NAP_MAX_S)
        if self._error is not None:
            raise self._error

    @property
    def deadline(self) -> float:
        return self._deadline

    @property
    def error(self) -> Exception | None:
        return self._error

    def fail(self, reason: str) -> None:
        if self._error is None:
            self._error = TransferError(f"{self._what} {reason}")

    def settled(self) -> bool:
        return self._error is not None or not self.moving


class _InFlight:
    """This transport's ops in the engine, oldest first, at most _DEPTH: a submitter finding no room
    checks the oldest until one finishes. Every check runs under one lock: the engine frees a
    batch when a check finds it finished and may give its id to the next batch, so a batch must be
    checked by one thread, once finished. A failed op's siblings stay to be checked (and freed)
    later; a timed-out op's batches are left to the engine (one may be lost, and freeing a batch
    whose op may still touch memory is not safe)."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._owners: dict[int, _EngineCompletion] = {}  # batch -> its completion, oldest first

    def submit(self, completion: _EngineCompletion, call: Any, *args: Any) -> None:
        """`call(*args)`, the engine's async submit of one op, once there is room; raises
        TransferError when the engine refuses it, or the submission failed or passed its deadline
        while waiting for room."""
        nap = _NAP_MIN_S
        while not self._submit_if_room(completion, call, args):
            if completion.error is not None:
                raise completion.error
            if time.monotonic() > completion.deadline:
                raise TransferError("no room in the engine's queue before the deadline")
            time.sleep(nap)
            nap = min(2 * nap, _NAP_MAX_S)

    def _submit_if_room(self, completion: _EngineCompletion, call: Any, args: tuple[Any, ...]) -> bool:
        with self._lock:
            if len(self._owners) >= _DEPTH and not self._retire_oldest():
                return False
            batch = call(*args)
            if batch in _NO_BATCH:
                raise TransferError(f"mooncake could not submit to {args[0]} (peer gone or unreachable)")
            self._owners[batch] = completion
            completion.moving.append(batch)
            return True

    def poll(self, completion: _EngineCompletion) -> bool:
        """Check the completion's ops, oldest first, up to the first still moving; True once settled."""
        with self._lock:
            for batch in list(completion.moving):
                if completion.settled() or not self._check(batch):
                    break
            return completion.settled()

    def abandon(self, completion: _EngineCompletion, reason: str) -> None:
        with self._lock:
            completion.fail(reason)
            for batch in completion.moving:
                del self._owners[batch]
            completion.moving.clear()

    def _retire_oldest(self) -> bool:
        """Check the oldest ops (they finish first) until one finishes; True when one did."""
        oldest = list(islice(self._owners, _RETIRE_SCAN))
        return any(self._check(batch) for batch in oldest if batch in self._owners)

    def _check(self, batch: int) -> bool:
        """One status check; a finished batch (freed by the engine) leaves. True when it left."""
        status = self._engine.transfer_check_status(batch)
        if status == 0:  # still moving
            return False
        completion = self._owners.pop(batch)
        completion.moving.remove(batch)
        if status != 1:  # -1: failed (peer gone, connection reset); -2: timed out in the engine
            completion.fail(f"failed in the engine ({status})")
        return True


class MooncakeRegion(Region):
    def __init__(self, tensor: torch.Tensor, descriptor: RegionDescriptor, engine: Any) -> None:
        super().__init__(tensor, descriptor)
        self._engine = engine

    def close(self) -> None:
        self._engine.unregister_memory(self.descriptor.address)


class MooncakeTransport(Transport):
    """Regions registered with this process's TransferEngine; peers reached by engine session."""

    backend: ClassVar[Backend] = "mooncake"

    def __init__(self, config: TransferConfig, node: str = "node0") -> None:
        try:
            from mooncake.engine import TransferEngine
        except ImportError as exc:  # the wheel, or the libibverbs1 it links against, is missing
            raise TransferError(f"the mooncake transport needs {INSTALL_HINT}: {exc}") from exc
        if config.mooncake_protocol == "tcp" and os.environ.get("MC_TCP_PROTO") == "1":
            raise TransferError(
                "MC_TCP_PROTO=1 makes Mooncake report a write complete before the peer has the bytes; "
                "unset it to use the mooncake transport"
            )
        if config.mooncake_protocol == "rdma":
            if config.kv_service_level is not None:
                os.environ["MC_IB_SL"] = str(config.kv_service_level)
            if config.kv_traffic_class is not None:
                os.environ["MC_IB_TC"] = str(config.kv_traffic_class)
        super().__init__(config, node)
        self._engine: Any = TransferEngine()
        rc = self._engine.initialize(
            config.mooncake_hostname, "P2PHANDSHAKE", config.mooncake_protocol, config.mooncake_device
        )
        if rc != 0:
            raise TransferError(
                f"mooncake transfer engine failed to start on {config.mooncake_hostname}: {rc}"
            )
        self.session = f"{config.mooncake_hostname}:{self._engine.get_rpc_port()}"
        self._pid = os.getpid()
        self._start = process_start(self._pid) or 0
        self._inflight = _InFlight(self._engine)

    def allocate(self, name: str, nbytes: int) -> Region:
        if nbytes <= 0:
            raise InvalidInput(f"a region needs a positive size, got {nbytes}")
        return self.register(name, aligned_empty(nbytes).zero_())

    def register(self, name: str, tensor: torch.Tensor) -> Region:
        """Register the tensor's memory in place: transfers land in it with no copy."""
        check_name(name)
        flat = region_tensor(tensor)
        if self._engine.register_memory(flat.data_ptr(), flat.numel()) != 0:
            raise TransferError(f"mooncake could not register region {name!r} ({flat.numel()} bytes)")
        descriptor = RegionDescriptor(
            "mooncake", name, flat.numel(), self.session, flat.data_ptr(), self._pid, self._start
        )
        return MooncakeRegion(flat, descriptor, self._engine)

    def attach(self, descriptor: RegionDescriptor) -> RemoteRegion:
        if descriptor.backend != "mooncake":
            raise InvalidInput(f"a {descriptor.backend} region cannot be attached by the mooncake transport")
        return RemoteRegion(descriptor)

    def _begin(self, direction: Direction, ops: list[TransferOp], what: str) -> Completion | None:
        """Unshaped ops go to the engine from the caller's thread (on an emulated link the base's
        workers send them chunk by chunk through `_move`)."""
        try:
            return self._launch(what, direction, ops)
        except TransferError as exc:
            return Completion(what, error=exc)

    def _move(self, direction: Direction, ops: Sequence[TransferOp]) -> None:
        self._launch(f"{direction} of {len(ops)} pieces", direction, ops).wait()

    def _launch(self, what: str, direction: Direction, ops: Sequence[TransferOp]) -> _EngineCompletion:
        """Submit every op as its own engine batch."""
        call = (
            self._engine.batch_transfer_async_write
            if direction == "write"
            else self._engine.batch_transfer_async_read
        )
        completion = _EngineCompletion(what, self._inflight, time.monotonic() + self.config.timeout_s)
        for op in ops:
            local = op.local.tensor.data_ptr() + op.local_offset
            remote = op.remote.descriptor.address + op.remote_offset
            self._inflight.submit(
                completion, call, op.remote.descriptor.endpoint, [local], [remote], [op.nbytes]
            )
        return completion
