"""Full Blocks and Layer Blocks: views over one contiguous buffer, never copies.

A Layer Block is one layer's KV for `block_size` tokens, `[block_size, 2, kv_heads, head_dim]`
(2 = K then V). A Full Block is its layers' Layer Blocks back to back, layer-major,
`[layers, block_size, 2, kv_heads, head_dim]`: the unit of every storage read and write.

A partial block (a sequence's last 1 .. block_size - 1 tokens, kv/keys.py) lives in the same
Full Block buffer everywhere (host buffers, transfers, the pool), its rows past its token count
unused; only storage packs it (`pack`: each layer's used rows, layer-major, `[layers, tokens, 2,
kv_heads, head_dim]`), so reading it costs its tokens' bytes, not a whole block's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import xxhash


@dataclass(frozen=True)
class KVLayout:
    """Shape of a model's KV, which fixes the byte layout of its blocks."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float32

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def layer_block_shape(self) -> tuple[int, int, int, int]:
        return (self.block_size, 2, self.num_kv_heads, self.head_dim)

    @property
    def full_block_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, *self.layer_block_shape)

    @property
    def layer_block_nbytes(self) -> int:
        return self.block_size * 2 * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def full_block_nbytes(self) -> int:
        return self.num_layers * self.layer_block_nbytes

    @property
    def bytes_per_token(self) -> int:
        return self.full_block_nbytes // self.block_size

    def blocks(self, tokens: int) -> int:
        """Blocks that hold `tokens` tokens, the last one perhaps partial."""
        return -(-tokens // self.block_size)

    def packed_nbytes(self, tokens: int) -> int:
        """Bytes of a block of `tokens` tokens in storage: a whole Full Block, or a packed partial one."""
        if not 0 < tokens <= self.block_size:
            raise ValueError(f"a block holds 1 to {self.block_size} tokens, not {tokens}")
        return tokens * self.bytes_per_token


class FullBlock:
    """A Full Block over a caller-owned byte buffer (host buffer slot, mmap, bytes read from storage)."""

    def __init__(self, layout: KVLayout, buffer: torch.Tensor | bytearray | memoryview | bytes) -> None:
        raw = buffer if isinstance(buffer, torch.Tensor) else torch.frombuffer(buffer, dtype=torch.uint8)
        if raw.dtype != torch.uint8 or raw.numel() != layout.full_block_nbytes or not raw.is_contiguous():
            raise ValueError(
                f"a Full Block needs {layout.full_block_nbytes} contiguous bytes, "
                f"got {raw.numel()} {raw.dtype}"
            )
        self.layout = layout
        self.raw = raw
        self.tensor = raw.view(layout.dtype).view(layout.full_block_shape)

    @classmethod
    def empty(cls, layout: KVLayout) -> FullBlock:
        return cls(layout, torch.empty(layout.full_block_nbytes, dtype=torch.uint8))

    def layer(self, layer: int) -> torch.Tensor:
        """Layer Block `layer`: a view, `[block_size, 2, kv_heads, head_dim]`."""
        return self.tensor[layer]

    def layer_bytes(self, layer: int) -> torch.Tensor:
        n = self.layout.layer_block_nbytes
        return self.raw[layer * n : (layer + 1) * n]

    def checksum(self) -> int:
        return payload_checksum(self.raw)

    def pack(self, tokens: int, out: torch.Tensor) -> torch.Tensor:
        """The first `tokens` rows of every Layer Block, packed layer-major into `out` (uint8, at least
        `layout.packed_nbytes(tokens)`); returns the packed bytes, a view of `out`."""
        self._rows(out, tokens)[:] = self.tensor[:, :tokens]
        return out[: self.layout.packed_nbytes(tokens)]

    def unpack(self, tokens: int) -> None:
        """In place: the buffer begins with `tokens` packed rows (`pack`); spread them to the Full Block
        layout and zero the rows past them (attention reads them masked: they must be finite)."""
        self.tensor[:, :tokens] = self._rows(self.raw, tokens).clone()
        self.tensor[:, tokens:] = 0

    def _rows(self, raw: torch.Tensor, tokens: int) -> torch.Tensor:
        """`raw`'s first bytes as packed rows, `[layers, tokens, 2, kv_heads, head_dim]`."""
        shape = (self.layout.num_layers, tokens, *self.layout.layer_block_shape[1:])
        return raw[: self.layout.packed_nbytes(tokens)].view(self.layout.dtype).view(shape)


def payload_checksum(payload: torch.Tensor | bytes | bytearray | memoryview) -> int:
    """64-bit XXH3 of the payload bytes: fast enough to run on every load at storage speed."""
    if isinstance(payload, torch.Tensor):
        payload = payload.contiguous().view(torch.uint8).numpy().data
    return xxhash.xxh3_64_intdigest(payload)
