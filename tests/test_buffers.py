"""Host buffer pools: aligned slot views over one region, backpressure, and direct reads into slots."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dualpath_sdk.errors import BufferTimeout, InvalidInput
from dualpath_sdk.kv.block import FullBlock, KVLayout
from dualpath_sdk.kv.keys import block_keys, namespace_key
from dualpath_sdk.store.aligned import ALIGN
from dualpath_sdk.store.buffers import HostBufferPool, NodeBuffers
from dualpath_sdk.store.fs import FsStore

LAYOUT = KVLayout(num_layers=2, block_size=8, num_kv_heads=2, head_dim=24)  # 3072 bytes: under a page


def test_slots_are_aligned_disjoint_views_of_one_region() -> None:
    pool = HostBufferPool(LAYOUT, 4)
    slots = pool.acquire(4)
    assert sorted(s.index for s in slots) == [0, 1, 2, 3]
    for slot in slots:
        assert slot.block.raw.data_ptr() % ALIGN == 0
        assert slot.block.raw.data_ptr() == pool.region.data_ptr() + slot.offset
        slot.block.raw.fill_(slot.index + 1)
    for slot in slots:
        assert torch.all(pool.region[slot.offset : slot.offset + LAYOUT.full_block_nbytes] == slot.index + 1)
    assert pool.free == 0
    pool.release(slots)
    assert pool.free == 4


def test_no_pinned_memory_without_cuda() -> None:
    pool = HostBufferPool(LAYOUT, 1)
    assert pool.region.is_pinned() == torch.cuda.is_available()


def test_full_pool_waits_for_a_release() -> None:
    pool = HostBufferPool(LAYOUT, 2)
    held = pool.acquire(2)
    threading.Timer(0.2, pool.release, args=(held[:1],)).start()
    start = time.monotonic()
    got = pool.acquire(1, timeout=5)
    assert 0.15 < time.monotonic() - start < 2
    assert got[0].index == held[0].index


def test_a_wait_past_the_timeout_is_a_typed_error() -> None:
    pool = HostBufferPool(LAYOUT, 2)
    pool.acquire(1)
    start = time.monotonic()
    with pytest.raises(BufferTimeout):
        pool.acquire(2, timeout=0.1)
    assert time.monotonic() - start < 1
    assert pool.free == 1  # all or nothing: the failed request took no slot


def test_misuse_is_rejected() -> None:
    pool = HostBufferPool(LAYOUT, 2)
    with pytest.raises(InvalidInput):
        pool.acquire(3)
    slots = pool.acquire(1)
    pool.release(slots)
    with pytest.raises(InvalidInput):
        pool.release(slots)
    other = HostBufferPool(LAYOUT, 2)
    with pytest.raises(InvalidInput):
        other.release(pool.acquire(1))


def test_lease_returns_slots_even_on_error() -> None:
    pool = HostBufferPool(LAYOUT, 3)
    with pytest.raises(RuntimeError), pool.lease(2):
        assert pool.free == 1
        raise RuntimeError("step failed")
    assert pool.free == 3


def test_store_reads_straight_into_de_buffer_slots(tmp_path: Path) -> None:
    node = NodeBuffers.create(LAYOUT, pe_slots=2, de_slots=4)
    assert (node.pe.capacity, node.de.capacity) == (2, 4)
    keys = block_keys(namespace_key("m", "float32", 8), list(range(32)), 8)
    store = FsStore(tmp_path / "s")
    for i, key in enumerate(keys):
        store.put(key, None, 8, FullBlock(LAYOUT, bytearray(np.full(LAYOUT.full_block_nbytes, i, np.uint8))))
    with node.de.lease(4) as slots:
        assert store.read_many([(k, s.block) for k, s in zip(keys, slots, strict=True)]) == [True] * 4
        for i, slot in enumerate(slots):
            assert torch.all(slot.block.raw == i)
    store.close()
