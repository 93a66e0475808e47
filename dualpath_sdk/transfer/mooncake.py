"""The `mooncake` transport: Mooncake Transfer Engine, TCP on these machines, RDMA on clusters.

Each transport owns one TransferEngine started with P2P handshake (no metadata server): a peer is
addressed by its engine's "host:rpc_port", and a region by its address inside that engine, so a
descriptor carries both. Regions are registered memory (register_memory), so writes and reads are
one-sided and zero-copy on RDMA. Batches go to the engine in one call per peer, which slices and
runs them in parallel itself; the calls release the GIL, so the worker threads overlap compute.
On RDMA the whole process's traffic through this engine is KV traffic: `kv_service_level` and
`kv_traffic_class` become Mooncake's MC_IB_SL / MC_IB_TC before the engine starts (Mooncake reads
them once per process); model traffic (collectives) keeps its own lane. TCP ignores both.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from dualpath_sdk.config import TransferConfig
from dualpath_sdk.errors import InvalidInput, TransferError
from dualpath_sdk.store.aligned import aligned_empty
from dualpath_sdk.transfer.base import (
    Backend,
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

    def _move(self, direction: Direction, ops: Sequence[TransferOp]) -> None:
        by_peer: dict[str, list[TransferOp]] = defaultdict(list)
        for op in ops:
            by_peer[op.remote.descriptor.endpoint].append(op)
        call = (
            self._engine.batch_transfer_sync_write
            if direction == "write"
            else self._engine.batch_transfer_sync_read
        )
        for peer, peer_ops in by_peer.items():
            rc = call(
                peer,
                [op.local.tensor.data_ptr() + op.local_offset for op in peer_ops],
                [op.remote.descriptor.address + op.remote_offset for op in peer_ops],
                [op.nbytes for op in peer_ops],
            )
            if rc != 0:
                raise TransferError(f"mooncake {direction} to {peer} failed: {rc} (peer gone or unreachable)")
