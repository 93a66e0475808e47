"""EngineCore: one model, one KV pool, continuous batching. The PE and DE processes drive it.

Each `step()` is schedule -> run -> postprocess:
- schedule: every running sequence gets its pending tokens (1 while decoding, a prompt chunk while
  prefilling) within `max_batch_tokens`; waiting sequences are admitted FIFO while the pool has
  blocks for their whole prompt + max_tokens (so a running sequence never runs out of blocks);
- run: one forward over the ragged batch, layer by layer; a sequence with a CachedPrefix gets
  layer k of it copied into its blocks just before layer k runs;
- postprocess: sample where a sequence's tokens are all computed, register completed blocks'
  keys for prefix sharing, finish on a stop token or max_tokens (`on_finish` sees a finishing
  sequence while the pool still holds its blocks: the DE persists its last ones from them).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from dualpath_sdk.config import EngineConfig, KVChoice, KVDtype
from dualpath_sdk.engine.sampler import sample
from dualpath_sdk.engine.sequence import CachedPrefix, SamplingParams, Sequence, Status
from dualpath_sdk.errors import ContextTooLong, InvalidInput
from dualpath_sdk.kv.block import FullBlock, KVLayout
from dualpath_sdk.kv.keys import BlockKey, block_keys, chain_key, namespace_key
from dualpath_sdk.kv.pool import KVPool
from dualpath_sdk.model.attention import AttentionBatch, SeqSlice
from dualpath_sdk.model.loader import Model


def check_token_ids(token_ids: Seq[int], vocab_size: int) -> None:
    """InvalidInput unless every id is an int in [0, vocab_size)."""
    if not all(type(t) is int and 0 <= t < vocab_size for t in token_ids):
        raise InvalidInput(f"token ids must be ints in [0, {vocab_size})")


@dataclass(frozen=True)
class Completion:
    prompt_ids: list[int]
    output_ids: list[int]
    finish_reason: str
    cached_tokens: int


KV_DTYPES: dict[KVDtype, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def kv_dtype(model: Model, choice: KVChoice) -> KVDtype:
    """EngineConfig.kv_dtype resolved for `model`: "auto" keeps fp32 weights' KV fp32 (the form exact
    against transformers) and gives quantized weights fp16, half the bytes in every tier (the default
    model in int4: greedy tokens 0.947 identical to fp32's on the agreement prompts, parting only late at
    near-ties of fp32's own logits, where bf16 gave 0.775, parting at token 1; bench engine)."""
    if choice != "auto":
        return choice
    return "fp32" if model.weights == "fp32" else "fp16"


def kv_layout(model: Model, block_size: int, kv: KVChoice = "fp32") -> KVLayout:
    """The shape and dtype of `model`'s KV blocks, and so of its Full Blocks in every tier. The
    activations stay in the model's dtype; K/V are rounded to `kv`'s dtype as they enter the pool."""
    spec = model.spec
    dtype = KV_DTYPES[kv_dtype(model, kv)]
    return KVLayout(spec.num_layers, block_size, spec.num_kv_heads, spec.head_dim, dtype)


class EngineCore:
    def __init__(self, model: Model, config: EngineConfig | None = None) -> None:
        self.model = model
        self.config = config or EngineConfig()
        self.layout = kv_layout(model, self.config.block_size, self.config.kv_dtype)
        self.pool = KVPool(self.layout, self.config.num_blocks)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.on_finish: Callable[[Sequence], None] | None = None

    # ---- requests -------------------------------------------------------------------------

    def root_key(self, tenant: str = "default") -> BlockKey:
        return namespace_key(self.model.fingerprint, self.layout.dtype_name, self.layout.block_size, tenant)

    def add(
        self,
        prompt_ids: Seq[int],
        params: SamplingParams | None = None,
        *,
        tenant: str = "default",
        prefix: CachedPrefix | None = None,
    ) -> Sequence:
        """Queue a request. `prefix` supplies the KV of its first blocks (else reused or computed)."""
        params = params or SamplingParams()
        params.check()
        if not prompt_ids:
            raise InvalidInput("the prompt is empty")
        check_token_ids(prompt_ids, self.model.spec.vocab_size)
        limit = self.model.spec.max_position
        if len(prompt_ids) + params.max_tokens > limit:
            raise ContextTooLong(
                f"{len(prompt_ids)} prompt tokens + max_tokens {params.max_tokens} "
                f"exceed the context of {limit}"
            )
        need = self.layout.blocks(len(prompt_ids) + params.max_tokens)
        if need > self.pool.num_blocks:
            raise ContextTooLong(f"the request needs {need} KV blocks; the pool has {self.pool.num_blocks}")
        if prefix is not None and prefix.num_tokens >= len(prompt_ids):
            raise InvalidInput("a cached prefix must leave at least one prompt token to compute")
        seq = Sequence(prompt_ids, params, self.root_key(tenant), prefix)
        self.waiting.append(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.running:
            self._finish(seq, "abort")

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- the loop --------------------------------------------------------------------------

    def step(self, only: Sequence | None = None) -> list[Sequence]:
        """Run one forward; returns the sequences that got a new token (finished ones included).

        `only`: step that one sequence alone (admitting it if it waits), to find which request of a
        batch that raised is the bad one."""
        work = self._schedule() if only is None else self._schedule_alone(only)
        if not work:
            return []
        logits = self._run(work)
        sampled = [seq for seq, n in work if seq.num_computed + n == len(seq.token_ids)]
        for seq, n in work:
            seq.num_computed += n
            self._register_full_blocks(seq)
        for seq, token in zip(sampled, sample(logits, sampled), strict=True):
            seq.token_ids.append(token)
            self._check_stop(seq, token)
        return sampled

    def generate(self, prompts: Iterable[Seq[int]], params: SamplingParams | None = None) -> list[Completion]:
        seqs = [self.add(p, params) for p in prompts]
        while self.has_work:
            self.step()
        return [
            Completion(s.token_ids[: s.prompt_len], s.output_ids, s.finish_reason or "", s.num_cached)
            for s in seqs
        ]

    # ---- KV in and out ---------------------------------------------------------------------

    def export_prefix(self, token_ids: Seq[int], tenant: str = "default") -> list[FullBlock]:
        """Full Blocks of the longest prefix of `token_ids` that the pool holds."""
        keys = block_keys(self.root_key(tenant), token_ids, self.layout.block_size)
        blocks = self.pool.match_prefix(keys)
        try:
            return [self.pool.export_block(b, FullBlock.empty(self.layout)) for b in blocks]
        finally:
            self.pool.free(blocks)

    # ---- internals -------------------------------------------------------------------------

    def _schedule(self) -> list[tuple[Sequence, int]]:
        budget = self.config.max_batch_tokens
        work: list[tuple[Sequence, int]] = []
        for seq in self.running:
            if budget == 0:
                break
            n = min(seq.num_pending, budget)
            work.append((seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running:
            seq = self.waiting[0]
            if not self._admit(seq):
                break
            self.waiting.popleft()
            self.running.append(seq)
            n = min(seq.num_pending, budget)
            work.append((seq, n))
            budget -= n
        return work

    def _schedule_alone(self, seq: Sequence) -> list[tuple[Sequence, int]]:
        if seq.status == Status.WAITING:
            if not self._admit(seq):
                return []
            self.waiting.remove(seq)
            self.running.append(seq)
        return [(seq, min(seq.num_pending, self.config.max_batch_tokens))]

    def _admit(self, seq: Sequence) -> bool:
        """Give `seq` its blocks: shared prefix blocks from the pool, fresh ones for the rest."""
        bs = self.layout.block_size
        shareable = (seq.prompt_len - 1) // bs  # at least one prompt token is always computed
        keys = block_keys(seq.root_key, seq.token_ids[: shareable * bs], bs)
        shared = self.pool.match_prefix(keys)
        total = self.layout.blocks(seq.prompt_len + seq.params.max_tokens)
        if total - len(shared) > self.pool.num_free:
            self.pool.free(shared)
            return False
        seq.block_table = shared + self.pool.allocate(total - len(shared))
        seq.keys = keys[: len(shared)]
        prefix_tokens = seq.prefix.num_tokens if seq.prefix is not None else 0
        if prefix_tokens <= len(shared) * bs:
            seq.prefix = None  # the pool already holds all of it
        seq.num_cached = seq.num_computed = max(len(shared) * bs, prefix_tokens)
        seq.status = Status.RUNNING
        return True

    def _run(self, work: list[tuple[Sequence, int]]) -> torch.Tensor:
        model = self.model.transformer
        slices = [SeqSlice(seq.num_computed, n, seq.block_table) for seq, n in work]
        batch = AttentionBatch.build(slices, self.layout.block_size)
        batch.cos, batch.sin = model.rope(batch.positions)
        tokens = [t for seq, n in work for t in seq.token_ids[seq.num_computed : seq.num_computed + n]]
        loads = [seq for seq, _ in work if seq.prefix is not None]
        hidden = model.embed(torch.tensor(tokens))
        for layer in range(len(model.layers)):
            for seq in loads:
                self._load_prefix_layer(seq, layer)
            hidden = model.layer(layer, hidden, batch, self.pool.layer(layer))
        for seq in loads:
            seq.prefix = None
        ends = torch.tensor([n for _, n in work]).cumsum(0) - 1
        last = [i for i, (seq, n) in enumerate(work) if seq.num_computed + n == len(seq.token_ids)]
        return model.logits(hidden[ends[last]])

    def _load_prefix_layer(self, seq: Sequence, layer: int) -> None:
        assert seq.prefix is not None
        shared = len(seq.keys)  # blocks the pool already had; the prefix fills the rest
        blocks = seq.block_table[shared : self.layout.blocks(seq.prefix.num_tokens)]
        self.pool.import_layer(layer, blocks, seq.prefix.layer(layer)[shared:])

    def _register_full_blocks(self, seq: Sequence) -> None:
        bs = self.layout.block_size
        for index in range(len(seq.keys), seq.num_computed // bs):
            parent = seq.keys[-1] if seq.keys else seq.root_key
            key = chain_key(parent, seq.token_ids[index * bs : (index + 1) * bs])
            seq.keys.append(key)
            self.pool.register(seq.block_table[index], key)

    def stop_reason(self, params: SamplingParams, token: int, generated: int) -> str | None:
        """Why a sequence ends after generating `token` as its `generated`-th token, if it does."""
        stops = params.stop_token_ids if params.stop_token_ids is not None else self.model.spec.eos_token_ids
        if not params.ignore_eos and token in stops:
            return "stop"
        if generated >= params.max_tokens:
            return "length"
        return None

    def _check_stop(self, seq: Sequence, token: int) -> None:
        reason = self.stop_reason(seq.params, token, len(seq.output_ids))
        if reason is not None:
            self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        self.running.remove(seq)
        if self.on_finish is not None:
            self.on_finish(seq)  # before the blocks go back: a later allocation may overwrite them
        self.pool.free(seq.block_table)
