"""Torch's paged path: attention that reads K/V in place from the pool's blocks, pure torch.

A sequence's keys are split into segments of consecutive slots: runs of blocks that lie next to
each other in the pool (their K/V are one strided view, no copy), cut again where masking starts
(the new tokens' causal triangle, a sliding window's edge). Each segment is one call of SDPA's CPU
flash kernel, which returns its log-sum-exp, and the segments' outputs are merged by it. Queries
are laid out per KV head (`[kv_heads, new x group, D]`) so GQA reads each K/V row once for the
whole group, and a long prefill goes in tiles of QUERY_TILE queries, each a sequence of its own.
The fallback of the csrc/ kernel (model/kernel.py) and the reference it is tested against; it pays
a Python call per segment, so blocks scattered one by one cost it most.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch

from dualpath_sdk.model.attention import AttentionBatch, SeqSlice

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
QUERY_TILE = 256  # a long prefill runs in tiles of queries, so a causal mask is at most a tile square


@dataclass(frozen=True)
class _Segment:
    slot: int  # the first key's flat slot in a layer's KV; the segment's keys are consecutive slots
    length: int
    mask: torch.Tensor | None  # additive `[new x group, length]`; None: every query sees every key
    empty: torch.Tensor | None  # `[new x group]` rows that see none of these keys (None: no such row)


@dataclass(frozen=True)
class _SeqPlan:
    first: int  # the sequence's first row among the batch's new tokens
    new: int
    segments: tuple[_Segment, ...]


class PagedAttention:
    name = "paged"

    def attend(
        self, q: torch.Tensor, kv: torch.Tensor, batch: AttentionBatch, window: int | None
    ) -> torch.Tensor:
        heads, dim = q.shape[1], q.shape[2]
        kv_heads = kv.shape[3]
        group = heads // kv_heads
        key = ("paged", window, group, q.dtype)
        plans = batch.cached(
            key,
            lambda: [
                _plan(
                    SeqSlice(s.start + i, min(QUERY_TILE, s.new - i), s.block_table),
                    first + i,
                    batch.block_size,
                    window,
                    group,
                    q.dtype,
                )
                for s, first in zip(batch.seqs, batch.q_offsets.tolist(), strict=True)
                for i in range(0, s.new, QUERY_TILE)
            ],
        )
        flat = kv.view(-1, *kv.shape[2:])  # [slots, 2, kv_heads, D]: blocks merge into one slot axis
        keys, values = flat[:, 0].transpose(0, 1), flat[:, 1].transpose(0, 1)  # [kv_heads, slots, D]
        wide = kv.dtype != q.dtype  # a 16-bit pool under fp32 queries: each segment widened (a copy)
        out = torch.empty_like(q)
        for plan in plans:
            n = plan.new
            rows = q[plan.first : plan.first + n].view(n, kv_heads, group, dim).transpose(0, 1)
            rows = rows.reshape(1, kv_heads, n * group, dim)
            outs, lses = [], []
            for seg in plan.segments:
                part = slice(seg.slot, seg.slot + seg.length)
                k, v = keys[None, :, part], values[None, :, part]
                if wide:
                    k, v = k.to(q.dtype), v.to(q.dtype)
                o, lse = _FLASH(rows, k, v, attn_mask=seg.mask)
                if seg.empty is not None:  # the kernel leaves an empty row at 0 with lse 0: no weight
                    lse = lse.masked_fill(seg.empty, float("-inf"))
                    o = o.masked_fill(seg.empty[..., None], 0.0)
                outs.append(o)
                lses.append(lse)
            if len(outs) == 1:
                merged = outs[0]
            else:
                lse_all = torch.stack(lses)
                weights = torch.exp(lse_all - torch.logsumexp(lse_all, 0))
                merged = (torch.stack(outs) * weights[..., None]).sum(0)
            out[plan.first : plan.first + n].view(n, kv_heads, group, dim).copy_(
                merged.view(kv_heads, n, group, dim).transpose(0, 1)
            )
        return out


def _plan(
    seq: SeqSlice, first: int, block_size: int, window: int | None, group: int, dtype: torch.dtype
) -> _SeqPlan:
    """Cut a sequence's visible keys into segments of consecutive slots, each with its mask."""
    start, new = seq.start, seq.new
    end = start + new  # keys [lo, end) are seen by some query
    lo = 0 if window is None else max(0, start - window + 1)
    cuts = {lo, end, min(max(start + 1, lo), end)}  # keys before start + 1: every query sees them
    if window is not None:
        cuts.add(min(max(end - window, lo), end))  # keys from end - window on: every window has them
    table = seq.block_table
    for j in range(lo // block_size + 1, -(-end // block_size)):
        if table[j] != table[j - 1] + 1:
            cuts.add(j * block_size)  # a new run of blocks
    bounds = sorted(c for c in cuts if lo <= c <= end)
    q_pos = torch.arange(start, end).repeat_interleave(group)[:, None]  # [new x group, 1]
    segments = []
    for a, b in pairwise(bounds):
        slot = table[a // block_size] * block_size + a % block_size
        full = b - 1 <= start and (window is None or a >= end - window)
        if full:
            segments.append(_Segment(slot, b - a, None, None))
            continue
        k_pos = torch.arange(a, b)[None, :]
        allowed = k_pos <= q_pos
        if window is not None:
            allowed &= k_pos > q_pos - window
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))
        empty = ~allowed.any(1)
        segments.append(_Segment(slot, b - a, mask, empty[None, None] if bool(empty.any()) else None))
    return _SeqPlan(first, new, tuple(segments))
