"""One-sided transport between PE and DE processes (DESIGN.md, Transports).

transport = open_transport(TransferConfig(), node="de0")
region = transport.allocate("de-buffer", nbytes)      # the owner; region.descriptor goes to peers
remote = peer_transport.attach(region.descriptor)     # in the peer
peer_transport.write(peer_region, 0, remote, offset, n, cls="kv").wait()
"""

from __future__ import annotations

from dualpath_sdk.config import TransferConfig
from dualpath_sdk.transfer.base import (
    Completion,
    Region,
    RegionDescriptor,
    RemoteRegion,
    TransferOp,
    Transport,
)
from dualpath_sdk.transfer.link import PriorityLink, TrafficClass

__all__ = [
    "Completion",
    "PriorityLink",
    "Region",
    "RegionDescriptor",
    "RemoteRegion",
    "TrafficClass",
    "TransferOp",
    "Transport",
    "open_transport",
]


def open_transport(config: TransferConfig, node: str = "node0") -> Transport:
    """The configured backend; mooncake is imported only when chosen (an optional extra)."""
    if config.backend == "mooncake":
        from dualpath_sdk.transfer.mooncake import MooncakeTransport

        return MooncakeTransport(config, node)
    from dualpath_sdk.transfer.local import LocalTransport

    return LocalTransport(config, node)
