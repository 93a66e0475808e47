"""A request's life inside an engine: its tokens, its blocks, how far its KV is computed."""

from __future__ import annotations

import enum
import itertools
import math
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
        self.check()

    def check(self) -> None:
        """InvalidInput unless every field has its type and range. Engines call it again on every
        request they receive: unpickling skips __init__, and one bad request must not stop an engine."""
        if type(self.max_tokens) is not int or self.max_tokens < 1:
            raise InvalidInput(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not _finite(self.temperature) or self.temperature < 0:
            raise InvalidInput(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidInput(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (type(self.seed) is not int or not 0 <= self.seed < MAX_SEED):
            raise InvalidInput(f"seed must be an int in [0, 2**63), got {self.seed!r}")
        stops = self.stop_token_ids
        if stops is not None and (
            not isinstance(stops, tuple) or not all(type(t) is int and t >= 0 for t in stops)
        ):
            raise InvalidInput(f"stop_token_ids must be token ids (ints >= 0), got {stops!r}")
        if type(self.ignore_eos) is not bool:
            raise InvalidInput(f"ignore_eos must be a bool, got {self.ignore_eos!r}")


MAX_SEED = 2**63  # torch generators take 64-bit seeds; the DE continues from seed + 1


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class CachedPrefix(Protocol):
    """KV of a prompt's first blocks supplied from outside the pool, one layer at a time.

    The engine asks for layer k just before it runs layer k: this is the layer-wise load of
    PAPER.md (a buffer, a transport or storage behind `layer`). `num_tokens` need not fill its
    last block: a decode engine takes a whole prompt's KV, tail included, from its DE buffer, and a
    stored prefix may end in a partial block; the rows past `num_tokens` are computed over.
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
