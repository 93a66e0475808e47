"""The paged KV pool: one tensor of blocks, and the block manager that hands them out.

Layout `[layers, num_blocks, block_size, 2, kv_heads, head_dim]`: each layer's KV is contiguous
(what attention kernels want), and block `b` of every layer is a Full Block's worth of KV in the
same shape as the Full Block format, so export/import is one copy with no layout conversion.

Blocks whose tokens are complete carry their block key; when their last user frees them they stay
cached (reusable by a later prompt with the same prefix) until allocation needs the space,
least-recently-freed first: refcounted sharing of prefix blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from dualpath_sdk.kv.block import FullBlock, KVLayout
from dualpath_sdk.kv.keys import BlockKey


class OutOfBlocks(RuntimeError):
    """The pool has too few free blocks for a request right now; the caller waits or preempts."""


class KVPool:
    def __init__(self, layout: KVLayout, num_blocks: int) -> None:
        self.layout = layout
        self.num_blocks = num_blocks
        # zeroed: attention reads whole blocks and masks the unwritten tail, which must not be NaN
        self.kv = torch.zeros((layout.num_layers, num_blocks, *layout.layer_block_shape), dtype=layout.dtype)
        self._layers = self.kv.unbind(0)  # views made once: a decode step asks for each layer's
        self._refs = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._cached: OrderedDict[int, None] = OrderedDict()  # refcount 0 but keyed: reusable
        self._key_of: dict[int, BlockKey] = {}
        self._block_of: dict[BlockKey, int] = {}

    def layer(self, index: int) -> torch.Tensor:
        """Layer `index`'s KV, `[num_blocks, block_size, 2, kv_heads, head_dim]` (contiguous)."""
        return self._layers[index]

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take now (truly free plus cached-but-unused)."""
        return len(self._free) + len(self._cached)

    def match_prefix(self, keys: Sequence[BlockKey]) -> list[int]:
        """Take a reference on the cached blocks of the longest prefix of `keys`."""
        blocks: list[int] = []
        for key in keys:
            block = self._block_of.get(key)
            if block is None:
                break
            blocks.append(block)
        for block in blocks:
            self._acquire(block)
        return blocks

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise OutOfBlocks(f"need {n} blocks, {self.num_free} free")
        blocks = []
        for _ in range(n):
            if self._free:
                block, _ = self._free.popitem(last=False)
            else:  # evict the least recently freed cached block
                block, _ = self._cached.popitem(last=False)
                del self._block_of[self._key_of.pop(block)]
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: Sequence[int]) -> None:
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block] < 0:
                raise RuntimeError(f"block {block} freed more often than taken")
            if self._refs[block] == 0:
                if block in self._key_of:
                    self._cached[block] = None
                else:
                    self._free[block] = None

    def register(self, block: int, key: BlockKey) -> None:
        """Mark `block` as holding the complete KV of `key`, so later prompts can share it."""
        if key in self._block_of or block in self._key_of:
            return  # the same content is already cached (or this block already has its key)
        self._key_of[block] = key
        self._block_of[key] = block

    def key_of(self, block: int) -> BlockKey | None:
        return self._key_of.get(block)

    def export_block(self, block: int, out: FullBlock) -> FullBlock:
        out.tensor.copy_(self.kv[:, block])
        return out

    def import_layer(self, layer: int, blocks: Sequence[int], layer_blocks: torch.Tensor) -> None:
        """Copy `[n, block_size, 2, kv_heads, head_dim]` Layer Blocks of one layer into `blocks`."""
        self.kv[layer, torch.as_tensor(list(blocks), dtype=torch.long)] = layer_blocks

    def _acquire(self, block: int) -> None:
        if self._refs[block] == 0:
            self._cached.pop(block, None)
        self._refs[block] += 1
