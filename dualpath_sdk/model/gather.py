"""The gather path: each layer copies every block a sequence attends to into one contiguous tensor
(`index_select`), then torch SDPA reads it again under a mask over the padded batch.

It runs wherever SDPA runs (CUDA included) and is what the paged paths replaced on CPU: at 8K
cached tokens it copies the whole KV once more per decoded token. Kept as the baseline
`bench attention` measures them against, and as the path on devices without a paged backend yet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dualpath_sdk.model.attention import AttentionBatch


class GatherAttention:
    name = "gather"

    def attend(
        self, q: torch.Tensor, kv: torch.Tensor, batch: AttentionBatch, window: int | None
    ) -> torch.Tensor:
        num_heads, head_dim = q.shape[1], q.shape[2]
        n_seq, max_blocks = batch.block_tables.shape
        # whole blocks, with index_select: one memcpy per block (advanced indexing copies ~7x slower)
        context = kv.index_select(0, batch.block_tables.flatten()).view(
            n_seq, max_blocks * kv.shape[1], *kv.shape[2:]
        )
        context = context.to(q.dtype)  # a 16-bit pool: widened to the queries' dtype
        keys = context[:, :, 0].transpose(1, 2)
        values = context[:, :, 1].transpose(1, 2)
        q_index = batch.cached("gather-q-index", lambda: _q_index(batch))
        if q_index is None:
            queries = q.unsqueeze(0)
        else:
            queries = q.new_zeros(n_seq * batch.max_q, num_heads, head_dim)
            queries[q_index] = q
            queries = queries.view(n_seq, batch.max_q, num_heads, head_dim)
        mask = batch.cached(("gather-mask", window), lambda: _mask(batch, window))
        out = F.scaled_dot_product_attention(
            queries.transpose(1, 2),
            keys,
            values,
            attn_mask=mask,
            is_causal=mask is None,  # top-left aligned: query i sees keys 0..i, one query key 0 only
            enable_gqa=True,
        ).transpose(1, 2)
        if q_index is None:
            return out[0]
        return out.reshape(n_seq * batch.max_q, num_heads, head_dim)[q_index]


def _q_index(batch: AttentionBatch) -> torch.Tensor | None:
    """Each new token's row in the padded `[B * Qmax]` query layout; None when B == 1."""
    if len(batch.seqs) == 1:
        return None
    return torch.cat([torch.arange(s.new) + b * batch.max_q for b, s in enumerate(batch.seqs)])


def _mask(batch: AttentionBatch, window: int | None) -> torch.Tensor | None:
    """Boolean `[B, 1, Qmax, L]` (True = attend), or None where plain causal SDPA is exact."""
    n_seq, max_blocks = batch.block_tables.shape
    max_kv = max_blocks * batch.block_size
    if (window is None or window >= max_kv) and n_seq == 1 and int(batch.starts[0]) == 0:
        return None  # one sequence from position 0: plain causal (keys past the prompt stay unseen)
    q_pos = batch.starts[:, None] + torch.arange(batch.max_q)[None, :]  # [B, Qmax]
    k_pos = torch.arange(max_kv)
    allowed = k_pos[None, None, :] <= q_pos[:, :, None]
    if window is not None:
        allowed &= k_pos[None, None, :] > q_pos[:, :, None] - window
    # padded query rows attend to key 0 so no row is empty (their output is discarded)
    allowed[:, :, 0] |= torch.arange(batch.max_q)[None, :] >= batch.q_lens[:, None]
    return allowed[:, None]
