"""Storage tiers below the engine's KV pool: host buffers, the persistent store, session manifests."""

from __future__ import annotations

from dualpath_sdk.config import MooncakeConfig, StoreConfig
from dualpath_sdk.store.backend import BlockStore, StoreStats
from dualpath_sdk.store.limiter import StorageNicLimiter


def open_store(config: StoreConfig, node: str = "node0") -> BlockStore:
    """The persistent store `config` names, its reads and writes through `node`'s storage NIC (capped
    where `config` says, and counted always: `granted_bytes` reads the counts)."""
    limiter = StorageNicLimiter(node, config.snic_read_bps, config.snic_write_bps)
    if config.backend == "mooncake":
        from dualpath_sdk.store.mooncake import MooncakeStore

        return MooncakeStore(
            config.mooncake, config.root, config.capacity_bytes, config.read_threads, limiter=limiter
        )
    from dualpath_sdk.store.fs import FsStore

    return FsStore(
        config.root,
        config.capacity_bytes,
        config.read_threads,
        config.direct_io,
        limiter=limiter,
        index_journal=config.index_journal,
        reserve_bytes=config.reserve_bytes,
        index=config.index,
    )


__all__ = ["BlockStore", "MooncakeConfig", "StorageNicLimiter", "StoreConfig", "StoreStats", "open_store"]
