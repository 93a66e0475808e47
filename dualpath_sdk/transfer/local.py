"""The `local` transport: shared-memory regions between the processes of one host.

A region is a file under /dev/shm that its owner creates (owner-only, 0o600) and every attaching
peer mmaps, all of them seeing the same pages through a uint8 tensor (torch.frombuffer). A write is
one memcpy from the writer's region straight into the peer's mapped pages: no intermediate buffer,
no owner involvement.
Shared pages outlive their owner, so a dead peer would not fault a write: every move checks that
the owner is alive (a pidfd, opened at attach after checking the pid's start time against reuse)
and has not closed (unlinked) the region. Without link emulation a move runs in the caller's thread.
Files of owners that died without closing are swept by the next allocation on the host.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import secrets
import select
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch

from dualpath_sdk.config import TransferConfig
from dualpath_sdk.errors import InvalidInput, TransferError
from dualpath_sdk.fsutil import PRIVATE_FILE
from dualpath_sdk.transfer.base import (
    Backend,
    Region,
    RegionDescriptor,
    RemoteRegion,
    TransferOp,
    Transport,
    check_name,
)
from dualpath_sdk.transfer.link import Direction

_PREFIX = "dualpath-xfer-"


def process_start(pid: int) -> int | None:
    """The start time of a live (not zombie) process, in clock ticks since boot; None when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state is field 3
    return None if fields[0] in "ZX" else int(fields[19])


class _Mapping:
    """A shared-memory file mapped into this process, as a uint8 tensor."""

    def __init__(self, path: Path, nbytes: int, create: bool) -> None:
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        self.fd = os.open(path, flags, PRIVATE_FILE)
        try:
            if create:
                os.ftruncate(self.fd, nbytes)
            elif os.fstat(self.fd).st_size < nbytes:
                raise TransferError(f"{path} is smaller than its descriptor says ({nbytes} bytes)")
            self.map = mmap.mmap(self.fd, nbytes)
        except BaseException:
            os.close(self.fd)
            raise
        self.tensor = torch.frombuffer(self.map, dtype=torch.uint8)

    def unlinked(self) -> bool:
        return os.fstat(self.fd).st_nlink == 0

    def close(self) -> None:
        del self.tensor
        # Views a caller still holds keep the pages exported: then the map goes with the last view.
        with contextlib.suppress(BufferError):
            self.map.close()
        os.close(self.fd)


class LocalRegion(Region):
    def __init__(self, mapping: _Mapping, descriptor: RegionDescriptor) -> None:
        super().__init__(mapping.tensor, descriptor)
        self._mapping = mapping

    def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.descriptor.endpoint)
        self._mapping.close()


class LocalRemoteRegion(RemoteRegion):
    """A peer's region mapped here, watched through a pidfd of its owner (readable once it exits)."""

    def __init__(self, mapping: _Mapping, descriptor: RegionDescriptor) -> None:
        super().__init__(descriptor)
        self.tensor = mapping.tensor
        self._mapping = mapping
        try:
            self._pidfd = os.pidfd_open(descriptor.owner_pid)
        except ProcessLookupError:
            self._pidfd = -1
        self._exit = select.poll()
        self._exit_lock = (
            threading.Lock()
        )  # a poll object refuses concurrent poll() (reads and writes run apart)
        if self._pidfd >= 0:
            self._exit.register(self._pidfd, select.POLLIN)

    def check_alive(self) -> None:
        """Two syscalls, cheap enough for every move: a pidfd poll and an fstat."""
        d = self.descriptor
        with self._exit_lock:
            exited = self._pidfd < 0 or bool(self._exit.poll(0))
        if exited:
            raise TransferError(f"the owner (pid {d.owner_pid}) of region {d.name!r} is gone")
        if self._mapping.unlinked():
            raise TransferError(f"region {d.name!r} was closed by its owner")

    def close(self) -> None:
        self._mapping.close()
        if self._pidfd >= 0:
            os.close(self._pidfd)


class LocalTransport(Transport):
    """Regions in /dev/shm (`config.shm_dir`), moved with one memcpy per piece."""

    backend: ClassVar[Backend] = "local"
    inline: ClassVar[bool] = True

    def __init__(self, config: TransferConfig, node: str = "node0") -> None:
        super().__init__(config, node)
        self._pid = os.getpid()
        start = process_start(self._pid)
        assert start is not None  # this process is alive
        self._start = start

    def allocate(self, name: str, nbytes: int) -> Region:
        check_name(name)
        if nbytes <= 0:
            raise InvalidInput(f"a region needs a positive size, got {nbytes}")
        sweep_dead_regions(self.config.shm_dir)
        path = self.config.shm_dir / f"{_PREFIX}{self._pid}-{self._start}-{name}-{secrets.token_hex(4)}"
        descriptor = RegionDescriptor("local", name, nbytes, str(path), 0, self._pid, self._start)
        return LocalRegion(_Mapping(path, nbytes, create=True), descriptor)

    def register(self, name: str, tensor: torch.Tensor) -> Region:
        """Not possible here: a peer process cannot map this process's private memory. Allocate
        the region instead and build the buffer over its tensor (e.g. a host buffer pool's slots)."""
        raise InvalidInput("the local transport cannot share existing private memory; use allocate()")

    def attach(self, descriptor: RegionDescriptor) -> RemoteRegion:
        if descriptor.backend != "local":
            raise InvalidInput(f"a {descriptor.backend} region cannot be attached by the local transport")
        try:
            mapping = _Mapping(Path(descriptor.endpoint), descriptor.nbytes, create=False)
        except FileNotFoundError:
            raise TransferError(f"region {descriptor.name!r} no longer exists") from None
        remote = LocalRemoteRegion(mapping, descriptor)
        if process_start(descriptor.owner_pid) != descriptor.owner_start:  # the pidfd is of a reused pid
            remote.close()
            raise TransferError(
                f"the owner (pid {descriptor.owner_pid}) of region {descriptor.name!r} is gone"
            )
        remote.check_alive()
        return remote

    def _move(self, direction: Direction, ops: Sequence[TransferOp]) -> None:
        remotes = {id(op.remote): op.remote for op in ops}
        for remote in remotes.values():
            _local_remote(remote).check_alive()
        for op in ops:
            mine = op.local.tensor.data_ptr() + op.local_offset
            theirs = _local_remote(op.remote).tensor.data_ptr() + op.remote_offset
            src, dst = (mine, theirs) if direction == "write" else (theirs, mine)
            ctypes.memmove(dst, src, op.nbytes)  # releases the GIL; one thread, no OpenMP team
        # The copy cannot fail on a dead owner's pages: check again so the caller learns it.
        for remote in remotes.values():
            _local_remote(remote).check_alive()


def _local_remote(remote: RemoteRegion) -> LocalRemoteRegion:
    if not isinstance(remote, LocalRemoteRegion):
        raise InvalidInput("the local transport moves bytes only to regions it attached")
    return remote


def sweep_dead_regions(directory: Path) -> int:
    """Unlink region files whose owner died without closing them; returns how many."""
    swept = 0
    for path in directory.glob(f"{_PREFIX}*"):
        pid, start = path.name.removeprefix(_PREFIX).split("-")[:2]
        if pid.isdigit() and start.isdigit() and process_start(int(pid)) != int(start):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                swept += 1
    return swept
