"""A request's life inside an engine: its tokens, its blocks, how far its KV is computed."""

from __future__ import annotations

import enum
import itertools
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Protocol

import torch

from dualpath_sdk.errors import InvalidInput
from dualpath_sdk.kv.block import FullBlock
from dualpath_sdk.kv.keys import BlockKey


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's end-of-sequence tokens
    ignore_eos: bool = False  # benchmarks force generation lengths

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise InvalidInput(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise InvalidInput(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidInput(f"top_p must be in (0, 1], got {self.top_p}")


class CachedPrefix(Protocol):
    """KV of a prompt's first blocks supplied from outside the pool, one layer at a time.

    The engine asks for layer k just before it runs layer k: this is the layer-wise load of
    PAPER.md (a buffer, a transport or storage behind `layer`). `num_tokens` need not fill its
    last block: a decode engine takes a whole prompt's KV, tail included, from its DE buffer.
    """

    @property
    def num_tokens(self) -> int: ...

    def layer(self, index: int) -> torch.Tensor:
        """Layer `index`: `[ceil(num_tokens / block_size), block_size, 2, kv_heads, head_dim]`."""
        ...


class FullBlockPrefix:
    """A CachedPrefix over Full Blocks (read from storage or exported by another engine)."""

    def __init__(self, blocks: Seq[FullBlock], num_tokens: int | None = None) -> None:
        self.blocks = list(blocks)
        self._num_tokens = (
            num_tokens if num_tokens is not None else len(self.blocks) * self.blocks[0].layout.block_size
        )

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    def layer(self, index: int) -> torch.Tensor:
        return torch.stack([block.layer(index) for block in self.blocks])


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


class Sequence:
    def __init__(
        self, prompt_ids: Seq[int], params: SamplingParams, root_key: BlockKey, prefix: CachedPrefix | None
    ) -> None:
        self.id = next(_ids)
        self.token_ids = list(prompt_ids)
        self.prompt_len = len(self.token_ids)
        self.params = params
        self.root_key = root_key
        self.prefix = prefix  # consumed by the first forward
        self.block_table: list[int] = []
        self.keys: list[BlockKey] = []  # keys of the complete blocks registered so far
        self.num_computed = 0  # tokens whose KV is in the pool
        self.num_cached = 0  # prompt tokens whose KV was reused, not computed
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def num_pending(self) -> int:
        """Tokens whose KV still has to be computed (1 while decoding)."""
        return len(self.token_ids) - self.num_computed
