"""Attention over a paged KV tensor for a ragged batch (prefill chunks and decode steps mixed).

The batch metadata is built once per forward and shared by every layer: where each new token's
K/V goes (slot mapping), which blocks each sequence attends to (block tables), each sequence's
positions. `attention` stores the new K/V, then hands the layer to the backend chosen for the KV's
device, behind one interface (`AttentionBackend`): on CPU the csrc/ paged kernel (model/kernel.py)
or, where it cannot be built, torch's paged path (model/paged.py), both reading K/V in place from
the blocks; `gather` (model/gather.py) is the path they replaced, kept as the baseline the
benchmark measures them against. On CUDA, `gather` runs until a flashinfer backend (paged
prefill and decode over the same block tables) registers here.

`DUALPATH_ATTENTION` (auto | kernel | paged | gather) forces one; it is an environment variable,
not an EngineConfig field, because the choice belongs to a process and its device (every engine
process inherits it) and no engine code has to carry it. Keys past a sequence's length (the unused
tail of its last block) are never read by the paged paths; `gather` masks them, which is why KV
memory starts zeroed (0 x NaN is NaN).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
import torch.nn.functional as F

T = TypeVar("T")
CHOICES = ("auto", "kernel", "paged", "gather")
ENV = "DUALPATH_ATTENTION"


@dataclass(frozen=True)
class SeqSlice:
    """One sequence's part of a forward: `new` tokens on top of `start` tokens already in its KV."""

    start: int
    new: int
    block_table: Sequence[int]


@dataclass
class AttentionBatch:
    seqs: tuple[SeqSlice, ...]
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] flat slot of each new token in a layer's KV
    block_tables: torch.Tensor  # [B, max blocks] each sequence's blocks (padded with its first)
    q_offsets: torch.Tensor  # [B] each sequence's first row among the T new tokens
    starts: torch.Tensor  # [B]
    q_lens: torch.Tensor  # [B]
    max_q: int
    block_size: int
    cos: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    sin: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    _plans: dict[Any, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, seqs: Sequence[SeqSlice], block_size: int) -> AttentionBatch:
        slots, tables, positions = [], [], []
        max_blocks = max(-(-(s.start + s.new) // block_size) for s in seqs)
        for s in seqs:
            used = -(-(s.start + s.new) // block_size)
            table = torch.as_tensor(list(s.block_table[:used]), dtype=torch.long)
            pos = torch.arange(s.start, s.start + s.new)
            slots.append(table[pos // block_size] * block_size + pos % block_size)
            tables.append(F.pad(table, (0, max_blocks - used), value=int(table[0])))
            positions.append(pos)
        q_lens = torch.tensor([s.new for s in seqs])
        return cls(
            seqs=tuple(SeqSlice(s.start, s.new, list(s.block_table)) for s in seqs),
            positions=torch.cat(positions),
            slot_mapping=torch.cat(slots),
            block_tables=torch.stack(tables),
            q_offsets=q_lens.cumsum(0) - q_lens,
            starts=torch.tensor([s.start for s in seqs]),
            q_lens=q_lens,
            max_q=int(q_lens.max()),
            block_size=block_size,
        )

    def backend(self, device: torch.device) -> AttentionBackend:
        """The backend for `device`, chosen once per forward: every layer attends with the same one."""
        return self.cached(("backend", device), lambda: backend_for(device))

    def cached(self, key: Any, make: Callable[[], T]) -> T:
        """What a backend derives from this batch once per forward and reuses in every layer."""
        if key not in self._plans:
            self._plans[key] = make()
        return self._plans[key]


class AttentionBackend(Protocol):
    """One way to attend over the paged KV of one layer."""

    name: str

    def attend(
        self, q: torch.Tensor, kv: torch.Tensor, batch: AttentionBatch, window: int | None
    ) -> torch.Tensor:
        """`q` `[T, heads, D]` against `kv` (the layer's blocks, already holding the new tokens'
        K/V) -> `[T, heads, D]`. `window`: keys a query sees, itself included (None: all before it)."""
        ...


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv: torch.Tensor,
    batch: AttentionBatch,
    window: int | None,
) -> torch.Tensor:
    """Store the new `k`/`v` (`[T, kv_heads, D]`) in `kv`, then attend; returns `[T, heads, D]`. Every
    key is read back from `kv`, the new ones too, so a token's K/V is the same bits (the pool's dtype,
    EngineConfig.kv_dtype) whether it was computed in this forward or loaded."""
    slots = kv.view(-1, *kv.shape[2:])  # [num_blocks * block_size, 2, kv_heads, D]
    slots[batch.slot_mapping] = torch.stack([k, v], dim=1).to(kv.dtype)  # a 16-bit pool: rounded here
    return batch.backend(kv.device).attend(q, kv, batch, window)


_forced: list[str] = []
_backends: dict[tuple[str, str], AttentionBackend] = {}


def choice() -> str:
    """The backend asked for: `force_backend`'s, else `DUALPATH_ATTENTION`'s, else auto."""
    name = _forced[-1] if _forced else os.environ.get(ENV, "auto")
    if name not in CHOICES:
        raise ValueError(f"{ENV}={name!r}: expected one of {', '.join(CHOICES)}")
    return name


@contextmanager
def force_backend(name: str) -> Iterator[None]:
    """Run attention on backend `name` inside the block (benchmarks and tests compare them)."""
    if name not in CHOICES:
        raise ValueError(f"unknown attention backend {name!r}: expected one of {', '.join(CHOICES)}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def backend_for(device: torch.device) -> AttentionBackend:
    """The backend for `device` under the current choice, made once per (device type, choice)."""
    key = (device.type, choice())
    if key not in _backends:
        _backends[key] = _make(*key)
    return _backends[key]


def _make(device_type: str, name: str) -> AttentionBackend:
    from dualpath_sdk.model.gather import GatherAttention

    if device_type != "cpu":
        if name in ("auto", "gather"):
            return GatherAttention()  # flashinfer's paged kernels plug in here for CUDA
        raise ValueError(f"attention backend {name!r} runs on CPU only, not on {device_type}")
    if name == "gather":
        return GatherAttention()
    from dualpath_sdk.model.kernel import KernelAttention, kernel_op
    from dualpath_sdk.model.paged import PagedAttention

    if name == "paged":
        return PagedAttention()
    op = kernel_op()
    if op is None:
        if name == "kernel":
            raise RuntimeError(f"{ENV}=kernel, but the paged attention kernel is unavailable (see the log)")
        return PagedAttention()
    return KernelAttention(op, PagedAttention())
