"""Block keys, Full/Layer Block views and the paged KV pool."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dualpath_sdk.kv.block import FullBlock, KVLayout, payload_checksum
from dualpath_sdk.kv.keys import block_keys, chain_key, namespace_key
from dualpath_sdk.kv.pool import KVPool, OutOfBlocks

LAYOUT = KVLayout(num_layers=3, block_size=4, num_kv_heads=2, head_dim=8)
ROOT = namespace_key("model-a", "float32", 4)


def test_keys_agree_across_processes() -> None:
    code = (
        "from dualpath_sdk.kv.keys import block_keys, namespace_key;"
        "print(block_keys(namespace_key('model-a', 'float32', 4), list(range(10)), 4)[-1].hex())"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == block_keys(ROOT, list(range(10)), 4)[-1].hex()


def test_namespace_separates_models_dtypes_block_sizes_and_tenants() -> None:
    roots = {
        ROOT,
        namespace_key("model-b", "float32", 4),
        namespace_key("model-a", "bfloat16", 4),
        namespace_key("model-a", "float32", 8),
        namespace_key("model-a", "float32", 4, tenant="other"),
    }
    assert len(roots) == 5


@given(st.lists(st.integers(0, 2**31), min_size=8, max_size=40), st.integers(0, 7))
def test_a_key_names_its_whole_prefix(tokens: list[int], flip: int) -> None:
    keys = block_keys(ROOT, tokens, 4)
    assert len(keys) == len(tokens) // 4
    changed = list(tokens)
    changed[flip] += 1
    other = block_keys(ROOT, changed, 4)
    # a change in block 0 or 1 changes that block's key and every key after it
    assert all(a != b for a, b in zip(keys[flip // 4 :], other[flip // 4 :], strict=True))
    assert keys[: flip // 4] == other[: flip // 4]
    assert keys[0] == chain_key(ROOT, tokens[:4])


def test_full_block_is_layer_blocks_back_to_back() -> None:
    block = FullBlock.empty(LAYOUT)
    for layer in range(LAYOUT.num_layers):
        block.layer(layer).fill_(layer)
    raw = block.raw.view(torch.float32)
    per_layer = LAYOUT.layer_block_nbytes // 4
    for layer in range(LAYOUT.num_layers):
        assert torch.all(raw[layer * per_layer : (layer + 1) * per_layer] == layer)
    assert block.layer(1).data_ptr() == block.raw.data_ptr() + LAYOUT.layer_block_nbytes  # a view
    assert torch.equal(block.layer_bytes(2).view(torch.float32), block.layer(2).flatten())


def test_full_block_rejects_a_buffer_of_the_wrong_size() -> None:
    with pytest.raises(ValueError, match="Full Block needs"):
        FullBlock(LAYOUT, bytearray(LAYOUT.full_block_nbytes - 1))


def test_checksum_sees_one_flipped_bit() -> None:
    block = FullBlock.empty(LAYOUT)
    block.tensor.normal_()
    before = block.checksum()
    block.raw[123] ^= 1
    assert block.checksum() != before
    assert payload_checksum(bytes(block.raw.numpy())) == block.checksum()


def test_pool_shares_prefix_blocks_and_keeps_them_cached_after_free() -> None:
    pool = KVPool(LAYOUT, num_blocks=4)
    keys = block_keys(ROOT, list(range(8)), 4)
    a = pool.allocate(2)
    for block, key in zip(a, keys, strict=True):
        pool.register(block, key)
    assert pool.match_prefix(keys) == a  # a second user shares them
    pool.free(a)
    pool.free(a)
    assert pool.num_free == 4  # free again, but still cached
    assert pool.match_prefix(keys[:1]) == a[:1]
    pool.free(a[:1])


def test_pool_evicts_least_recently_freed_cached_block_first() -> None:
    pool = KVPool(LAYOUT, num_blocks=2)
    keys = block_keys(ROOT, list(range(8)), 4)
    first, second = pool.allocate(2)
    pool.register(first, keys[0])
    pool.register(second, keys[1])
    pool.free([second])
    pool.free([first])
    (taken,) = pool.allocate(1)
    assert taken == second
    assert pool.match_prefix([keys[0]]) == [first]
    assert pool.key_of(second) is None


def test_pool_refuses_to_overallocate_and_to_double_free() -> None:
    pool = KVPool(LAYOUT, num_blocks=2)
    blocks = pool.allocate(2)
    with pytest.raises(OutOfBlocks):
        pool.allocate(1)
    pool.free(blocks)
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free(blocks[:1])


def test_export_then_import_round_trips_a_block() -> None:
    pool = KVPool(LAYOUT, num_blocks=3)
    pool.kv.normal_()
    out = pool.export_block(1, FullBlock.empty(LAYOUT))
    other = KVPool(LAYOUT, num_blocks=3)
    for layer in range(LAYOUT.num_layers):
        other.import_layer(layer, [2], out.layer(layer)[None])
    assert torch.equal(other.kv[:, 2], pool.kv[:, 1])
