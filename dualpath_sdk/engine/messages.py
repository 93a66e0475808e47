"""Control messages between the cluster and its engine processes (pickled over a local socket).

The narrow interface of vLLM v1 between engine core and server: engines pull work (`Fetch`) and
report the paper's load figures; the cluster sends tasks and gets results. KV never travels here:
it moves between host buffers over the transport.
"""

from __future__ import annotations

from dataclasses import dataclass

from dualpath_sdk.config import Mode
from dualpath_sdk.engine.sequence import SamplingParams
from dualpath_sdk.errors import kind_of
from dualpath_sdk.scheduler import AttentionModel, Role
from dualpath_sdk.transfer import RegionDescriptor


@dataclass(frozen=True)
class Hello:
    engine_id: str
    role: Role
    node: str
    pid: int
    fingerprint: str  # the model's: part of every block key's namespace
    kv_dtype: str
    kv_bytes_per_token: int
    buffer: RegionDescriptor | None = None  # the DE buffer's region (DE only): PEs attach to it
    prefill_tps: float = 0.0  # PE: prompt tokens (len(r)) per second, profiled at start (beta)
    attention: AttentionModel | None = None  # PE: its fitted attention-time model


@dataclass(frozen=True)
class Report:
    """The paper's figures: unfinished requests, their tokens, the node's storage read queue; and
    the KV memory a DE can still hand out and the tokens/s its node's storage reads drained at."""

    engine_id: str
    seq: int
    tokens: int
    read_q: int
    free_tokens: int = 0
    read_tps: float = 0.0
    buffer_free: int = 0  # slots of the engine's host buffer (PE or DE buffer) not in use
    buffer_slots: int = 0
    store_reads: tuple[int, int, int] = (0, 0, 0)  # this engine's block reads so far: hits, misses, corrupt


@dataclass(frozen=True)
class Fetch:
    """An engine can take more work (the pull model): the cluster answers with queued tasks."""

    report: Report


# ---- cluster -> DE ----------------------------------------------------------------------------


def cached_block_tokens(index: int, cached_tokens: int, block_size: int) -> int:
    """Tokens of cached block `index` of a prefix of `cached_tokens`: a whole block, or fewer for the
    partial block that ends a prefix whose length is not a multiple of the block size."""
    return min(block_size, cached_tokens - index * block_size)


@dataclass(frozen=True)
class Admit:
    """Reserve DE buffer slots for a prompt and read `reads` (block index, key) into them."""

    req_id: str
    prompt_len: int
    reads: list[tuple[int, bytes]]
    cached_tokens: int  # tokens of the whole cached prefix (its last block may be partial)

    def read_tokens(self, block_size: int) -> list[int]:
        """Tokens of each of the DE's reads."""
        return [cached_block_tokens(i, self.cached_tokens, block_size) for i, _ in self.reads]


@dataclass(frozen=True)
class Decode:
    """The prompt's KV is complete in the DE buffer: persist its new Full Blocks, then decode."""

    req_id: str
    token_ids: list[int]  # prompt + the first token, sampled by the PE
    params: SamplingParams
    tenant: str
    stored_blocks: int  # leading prompt Full Blocks already in the store
    persist: bool = True  # oracle: its KV is garbage and must never reach the store


@dataclass(frozen=True)
class Cancel:
    req_id: str


# ---- cluster -> PE ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Prefill:
    """Prefill `token_ids` layer by layer on top of the blocks read on either side."""

    req_id: str
    token_ids: list[int]
    de_engine: str
    pe_reads: list[tuple[int, bytes]]  # (block index, key) the PE reads into its own buffer
    de_reads: list[int]  # block indices the DE reads into the DE buffer
    cached_tokens: int  # tokens the read blocks hold: the last block of the prefix may be partial
    params: SamplingParams
    mode: Mode = "dualpath"  # basic: no layer-wise overlap; oracle: no reads, no transfers (KV is garbage)

    def pe_read_tokens(self, block_size: int) -> list[int]:
        """Tokens of each of the PE's reads."""
        return [cached_block_tokens(i, self.cached_tokens, block_size) for i, _ in self.pe_reads]


@dataclass(frozen=True)
class DeSlots:
    """Where the DE buffer holds the request's blocks, and how many leading blocks it read intact."""

    req_id: str
    buffer: RegionDescriptor
    offsets: list[int]
    valid_reads: int


# ---- engines -> cluster -------------------------------------------------------------------------


@dataclass(frozen=True)
class Admitted:
    req_id: str
    offsets: list[int]
    valid_reads: int  # leading de_reads that read intact (a corrupt or missing block: recompute)
    read_s: float


@dataclass(frozen=True)
class Prefilled:
    req_id: str
    first_token: int
    num_cached: int  # prompt tokens whose KV was loaded, not computed (any count, not whole blocks)
    read_s: float
    prefill_s: float
    bytes_pe: int
    bytes_de: int


@dataclass(frozen=True)
class Tokens:
    req_id: str
    tokens: list[int]


@dataclass(frozen=True)
class Finished:
    req_id: str
    reason: str
    persisted: int  # blocks this request wrote to the store (Full Blocks, and its partial block)
    persist_failed: int = 0  # ... and those that failed to (the store is full or down)


@dataclass(frozen=True)
class Failed:
    """The engine could not serve one request; `kind` names the error's class in errors.py."""

    req_id: str
    kind: str
    error: str

    @classmethod
    def of(cls, req_id: str, exc: BaseException) -> Failed:
        return cls(req_id, kind_of(exc), f"{type(exc).__name__}: {exc}")
