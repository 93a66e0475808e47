"""Page-aligned host memory: direct I/O (O_DIRECT) moves data only between aligned buffers."""

from __future__ import annotations

import torch

ALIGN = 4096


def round_up(n: int, align: int = ALIGN) -> int:
    return -(-n // align) * align


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU uint8 tensor as a writable memoryview (no copy), for os.preadv."""
    return memoryview(tensor.numpy())  # type: ignore[arg-type]  # ndarray is a buffer; stubs disagree


def aligned_empty(nbytes: int, pin_memory: bool = False) -> torch.Tensor:
    """A uint8 tensor of `nbytes` whose first byte is ALIGN-aligned (torch only promises 64 bytes)."""
    base = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=pin_memory)
    skip = -base.data_ptr() % ALIGN
    return base[skip : skip + nbytes]
