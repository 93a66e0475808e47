"""Attention over a paged KV tensor for a ragged batch (prefill chunks and decode steps mixed).

The batch metadata is built once per forward and shared by every layer: where each new token's
K/V goes (slot mapping), which blocks each sequence attends to (block tables), and the mask.
Keys past a sequence's length (the unused tail of its last block, padding blocks) are masked out;
they must still be finite numbers (0 x NaN is NaN), which is why KV memory starts zeroed.
On CPU this runs torch SDPA; `attention` is the seam where a flashinfer paged kernel plugs in on CUDA.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SeqSlice:
    """One sequence's part of a forward: `new` tokens on top of `start` tokens already in its KV."""

    start: int
    new: int
    block_table: Sequence[int]


@dataclass
class AttentionBatch:
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] flat slot of each new token in a layer's KV
    block_tables: (
        torch.Tensor
    )  # [B, max blocks] each sequence's blocks (padded): attention gathers whole blocks
    q_index: torch.Tensor | None  # [T] row in the padded [B * Qmax] query layout; None when B == 1
    starts: torch.Tensor  # [B]
    q_lens: torch.Tensor  # [B]
    kv_lens: torch.Tensor  # [B]
    max_q: int
    block_size: int
    cos: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    sin: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    _masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict)

    @classmethod
    def build(cls, seqs: Sequence[SeqSlice], block_size: int) -> AttentionBatch:
        slots, tables, positions, q_index = [], [], [], []
        max_q = max(s.new for s in seqs)
        max_blocks = max(-(-(s.start + s.new) // block_size) for s in seqs)
        for b, s in enumerate(seqs):
            used = -(-(s.start + s.new) // block_size)
            table = torch.as_tensor(list(s.block_table[:used]), dtype=torch.long)
            pos = torch.arange(s.start, s.start + s.new)
            slots.append(table[pos // block_size] * block_size + pos % block_size)
            tables.append(F.pad(table, (0, max_blocks - used), value=int(table[0])))  # padding: masked out
            positions.append(pos)
            q_index.append(torch.arange(s.new) + b * max_q)
        return cls(
            positions=torch.cat(positions),
            slot_mapping=torch.cat(slots),
            block_tables=torch.stack(tables),
            q_index=torch.cat(q_index) if len(seqs) > 1 else None,
            starts=torch.tensor([s.start for s in seqs]),
            q_lens=torch.tensor([s.new for s in seqs]),
            kv_lens=torch.tensor([s.start + s.new for s in seqs]),
            max_q=max_q,
            block_size=block_size,
        )

    def mask(self, window: int | None) -> torch.Tensor | None:
        """Boolean `[B, 1, Qmax, L]` (True = attend), or None where plain causal SDPA is exact."""
        if window not in self._masks:
            self._masks[window] = self._build_mask(window)
        return self._masks[window]

    def _build_mask(self, window: int | None) -> torch.Tensor | None:
        batch, max_blocks = self.block_tables.shape
        max_kv = max_blocks * self.block_size
        if (window is None or window >= max_kv) and batch == 1 and int(self.starts[0]) == 0:
            return None  # one sequence from position 0: plain causal (keys past the prompt stay unseen)
        q_pos = self.starts[:, None] + torch.arange(self.max_q)[None, :]  # [B, Qmax]
        k_pos = torch.arange(max_kv)
        allowed = k_pos[None, None, :] <= q_pos[:, :, None]
        if window is not None:
            allowed &= k_pos[None, None, :] > q_pos[:, :, None] - window
        # padded query rows attend to key 0 so no row is empty (their output is discarded)
        allowed[:, :, 0] |= torch.arange(self.max_q)[None, :] >= self.q_lens[:, None]
        return allowed[:, None]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv: torch.Tensor,
    batch: AttentionBatch,
    window: int | None,
) -> torch.Tensor:
    """Store the new `k`/`v` (`[T, kv_heads, D]`) in `kv`, then attend; returns `[T, heads, D]`."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    slots = kv.view(-1, *kv.shape[2:])  # [num_blocks * block_size, 2, kv_heads, D]
    slots[batch.slot_mapping] = torch.stack([k, v], dim=1)
    n_seq, max_blocks = batch.block_tables.shape
    # whole blocks, with index_select: one memcpy per block (advanced indexing copies ~7x slower)
    context = kv.index_select(0, batch.block_tables.flatten()).view(
        n_seq, max_blocks * kv.shape[1], *kv.shape[2:]
    )
    keys = context[:, :, 0].transpose(1, 2)
    values = context[:, :, 1].transpose(1, 2)
    if batch.q_index is None:
        queries = q.unsqueeze(0)
    else:
        queries = q.new_zeros(n_seq * batch.max_q, num_heads, head_dim)
        queries[batch.q_index] = q
        queries = queries.view(n_seq, batch.max_q, num_heads, head_dim)
    mask = batch.mask(window)
    out = F.scaled_dot_product_attention(
        queries.transpose(1, 2),
        keys,
        values,
        attn_mask=mask,
        is_causal=mask is None and batch.max_q > 1,
        enable_gqa=True,
    ).transpose(1, 2)
    if batch.q_index is None:
        return out[0]
    return out.reshape(n_seq * batch.max_q, num_heads, head_dim)[batch.q_index]
