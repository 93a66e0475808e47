"""The decode engine (DE): owns the DE buffer where every prompt's KV gathers, and decodes.

Per request: `Admit` reserves buffer slots for the prompt's blocks and reads the DE's share of the
cached ones into them (DE read path); PEs then stream each layer's KV into the same slots. On
`Decode` the prompt's new Full Blocks are persisted straight from the slots, the sequence joins the
running batch (its first forward takes the prompt KV from the slots layer by layer, then the slots
are freed), and each Full Block of generated tokens is persisted as it fills.

When the request finishes, the KV of every token but the last one sampled exists (that one's KV is
the next turn's first computation); the tokens after the last Full Block are persisted as a partial
block under its `partial_key` (kv/keys.py), exported from the pool as the sequence finishes, before
its blocks are freed. It is written after the request's Full Blocks, by the same writer thread, and
`Finished` goes out only once every write is done: the caller saves the session's manifest after
that, so whatever a manifest names is already durable. The next turn's DE writes the Full Block at
that position; the superseded partial block is left to LRU eviction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import torch

from dualpath_sdk.config import EngineConfig
from dualpath_sdk.engine.core import EngineCore
from dualpath_sdk.engine.messages import Admit, Admitted, Decode, Failed, Finished, Hello, Role, Tokens
from dualpath_sdk.engine.sequence import MAX_SEED, Sequence, Status
from dualpath_sdk.engine.worker import Read, Worker
from dualpath_sdk.errors import ContextTooLong
from dualpath_sdk.kv.block import FullBlock
from dualpath_sdk.kv.keys import BlockKey, block_keys, partial_key
from dualpath_sdk.model.loader import Model
from dualpath_sdk.store.backend import BlockStore
from dualpath_sdk.store.buffers import BufferSlot
from dualpath_sdk.transfer import Transport

Send = Callable[[object], None]
log = logging.getLogger(__name__)


def _copy(block: FullBlock) -> FullBlock:
    out = FullBlock.empty(block.layout)
    out.raw.copy_(block.raw)
    return out


class _SlotPrefix:
    """A prompt's KV in DE buffer slots, as the CachedPrefix the engine core imports layer by layer."""

    def __init__(self, slots: list[BufferSlot], num_tokens: int) -> None:
        self.slots = slots
        self.num_tokens = num_tokens

    def layer(self, index: int) -> torch.Tensor:
        return torch.stack([slot.block.layer(index) for slot in self.slots])


@dataclass
class _DeRequest:
    """A request as the DE holds it, from `Admit` to `Finished`."""

    req_id: str
    prompt_len: int
    slots: list[BufferSlot]
    seq: Sequence | None = None
    persisted: int = 0  # blocks of this request written to the store (Full and partial)
    next_block: int = 0  # the first block of the sequence not yet persisted
    writes: list[Future[int]] = field(default_factory=list)  # each: how many of its blocks failed
    persist: bool = True


class DecodeWorker(Worker):
    """`send` takes the messages born on its I/O threads, the moment they happen: `Admitted` as a
    prompt's reads end, `Finished` as its writes are durable (thread-safe, it never waits for the loop)."""

    role: Role = "de"

    def __init__(
        self,
        engine_id: str,
        model: Model,
        config: EngineConfig,
        store: BlockStore,
        transport: Transport,
        buffer_slots: int,
        send: Send,
    ) -> None:
        self.core = EngineCore(model, config)
        super().__init__(engine_id, model, self.core.layout, store, transport, buffer_slots)
        self.send = send
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="de-persist")
        self.requests: dict[str, _DeRequest] = {}
        self.persist_causes: set[str] = set()  # why writes failed, each logged once
        self.core.on_finish = self._persist_last
        self.handlers.update({Admit: self.admit, Decode: self.decode})

    def hello(self, node: str) -> Hello:
        return replace(super().hello(node), buffer=self.region.descriptor)  # PEs attach to it

    @property
    def has_work(self) -> bool:
        return self.core.has_work

    # ---- load figures ------------------------------------------------------------------------

    @property
    def num_requests(self) -> int:
        return len(self.requests)

    @property
    def num_tokens(self) -> int:
        return sum(r.prompt_len if r.seq is None else len(r.seq.token_ids) for r in self.requests.values())

    @property
    def free_tokens(self) -> int:
        """KV memory a new request can still get: pool blocks not held or awaited, and buffer slots."""
        bs = self.layout.block_size
        awaited = sum(
            self.layout.blocks(r.prompt_len)
            for r in self.requests.values()
            if r.seq is None or r.seq.status == Status.WAITING
        )
        return max(min(self.core.pool.num_free - awaited, self.buffer.free), 0) * bs

    # ---- tasks ---------------------------------------------------------------------------------

    def admit(self, task: Admit) -> None:
        """Queue the prompt: once the buffer has slots for all its blocks, reserve them and read the
        DE's share of the cached blocks into them (never blocking the loop, whose steps free slots)."""
        need = self.layout.blocks(task.prompt_len)
        if need > self.buffer.capacity:
            raise ContextTooLong(
                f"a {need}-block prompt exceeds the DE buffer's {self.buffer.capacity} slots (buffer_slots)"
            )
        self.requests[task.req_id] = _DeRequest(task.req_id, task.prompt_len, [])
        tokens = task.read_tokens(self.layout.block_size)
        self.queue(task.req_id, need, sum(tokens), lambda slots: self._start(task, slots, tokens))

    def _start(self, task: Admit, slots: list[BufferSlot], tokens: list[int]) -> None:
        """The prompt has its DE buffer slots: read the DE's share of the cached blocks into them."""
        self.requests[task.req_id].slots = slots
        offsets = [slot.offset for slot in slots]
        if not task.reads:
            self.send(Admitted(req_id=task.req_id, offsets=offsets, valid_reads=0, read_s=0.0))
            return

        def admitted(reads: Future[Read]) -> None:
            if reads.cancelled():  # the engine is closing
                return
            if (exc := reads.exception()) is not None:  # the store failed (not a miss): the step fails
                self.send(Failed.of(task.req_id, exc))
                return
            read = reads.result()
            self.send(
                Admitted(req_id=task.req_id, offsets=offsets, valid_reads=read.valid, read_s=read.seconds)
            )

        self.read_blocks([(key, slots[i].block) for i, key in task.reads], tokens).add_done_callback(admitted)

    def decode(self, task: Decode) -> None:
        request = self.requests[task.req_id]
        prompt_len = len(task.token_ids) - 1
        root = self.core.root_key(task.tenant)
        keys = block_keys(root, task.token_ids[:prompt_len], self.layout.block_size)
        request.persisted = len(keys) - task.stored_blocks if task.persist else 0
        # copies: the slots go back to the buffer (and to other requests' PEs) before the writes finish
        blocks = [_copy(request.slots[i].block) for i in range(task.stored_blocks, len(keys))]
        parents = [keys[i - 1] if i else None for i in range(task.stored_blocks, len(keys))]
        request.persist = task.persist
        if blocks and task.persist:
            request.writes.append(
                self.writer.submit(self._put_all, keys[task.stored_blocks :], parents, blocks)
            )
        reason = self.core.stop_reason(task.params, task.token_ids[-1], 1)  # the PE's first token
        if reason is not None:  # the prompt's KV is all there is: its tail block is in the slots
            if task.persist and prompt_len % self.layout.block_size:
                tail = _copy(request.slots[len(keys)].block)
                self._persist_partial(request, root, task.token_ids[:prompt_len], keys, tail)
            self._finish(request, reason)
            return
        # the PE drew the first token from this seed's stream: continue from a different one
        seed = None if task.params.seed is None else (task.params.seed + 1) % MAX_SEED
        params = replace(task.params, max_tokens=task.params.max_tokens - 1, seed=seed)
        request.seq = self.core.add(
            task.token_ids, params, tenant=task.tenant, prefix=_SlotPrefix(request.slots, prompt_len)
        )
        request.next_block = len(keys)

    def cancel(self, req_id: str) -> None:
        self.unqueue(req_id)
        request = self.requests.get(req_id)
        if request is not None:
            if request.seq is not None and request.seq.status != Status.FINISHED:
                self.core.abort(request.seq)
            self._finish(request, "abort", notify=False)

    def step(self) -> Iterator[Tokens | Failed]:
        """Start the prompts whose slots are free now (freed by the last step or by a finished write);
        then one decode step of the running batch, streaming tokens and persisting filled blocks.

        Each `Tokens` is yielded before its request finishes, so the loop has sent it before the
        writer thread can send the request's `Finished`."""
        self.start_waiting()
        if not self.core.has_work:
            return
        failed: list[Failed] = []
        try:
            sampled = self.core.step()
        except Exception as exc:
            sampled, failed = self._step_each_alone(exc)
        yield from failed
        for request in list(self.requests.values()):
            seq = request.seq
            if seq is None:
                continue
            if request.slots and seq.prefix is None and seq.status != Status.WAITING:
                self.buffer.release(request.slots)  # the prompt KV is in the pool now
                request.slots = []
            self._persist_filled(request)
        for seq in sampled:
            request = self._by_seq(seq)
            yield Tokens(req_id=request.req_id, tokens=[seq.token_ids[-1]])
            if seq.status == Status.FINISHED:
                self._finish(request, seq.finish_reason or "stop")

    # ---- internals ------------------------------------------------------------------------------

    def _step_each_alone(self, exc: Exception) -> tuple[list[Sequence], list[Failed]]:
        """A batched step raised: step each sequence alone, so only a request that raises again
        fails (with its error's kind) and the engine serves the others on."""
        log.warning("a decode step of %d sequences raised (%r): stepping each alone", len(self.requests), exc)
        sampled, failed = [], []
        for seq in [*self.core.running, *self.core.waiting]:
            try:
                sampled += self.core.step(only=seq)
            except Exception as alone:
                request = self._by_seq(seq)
                self.cancel(request.req_id)
                failed.append(Failed.of(request.req_id, alone))
        return sampled, failed

    def _persist_filled(self, request: _DeRequest) -> None:
        seq = request.seq
        assert seq is not None
        new = range(request.next_block, len(seq.keys))
        if not new or not request.persist:
            return
        blocks = [self.core.pool.export_block(seq.block_table[i], FullBlock.empty(self.layout)) for i in new]
        parents = [seq.keys[i - 1] if i else None for i in new]
        request.writes.append(self.writer.submit(self._put_all, seq.keys[new.start :], parents, blocks))
        request.persisted += len(blocks)
        request.next_block = len(seq.keys)

    def _persist_last(self, seq: Sequence) -> None:
        """The core calls this as `seq` finishes, before its pool blocks are freed: persist its last
        filled Full Blocks and its partial block now, while the pool still holds them."""
        request = next((r for r in self.requests.values() if r.seq is seq), None)
        if request is None or seq.finish_reason == "abort" or not request.persist:
            return
        self._persist_filled(request)
        if seq.num_computed % self.layout.block_size:
            tail = seq.block_table[len(seq.keys)]
            block = self.core.pool.export_block(tail, FullBlock.empty(self.layout))
            self._persist_partial(request, seq.root_key, seq.token_ids[: seq.num_computed], seq.keys, block)

    def _persist_partial(
        self, request: _DeRequest, root: BlockKey, computed: list[int], keys: list[BlockKey], block: FullBlock
    ) -> None:
        """Persist `block` as the partial block of `computed` (the tokens whose KV exists): the
        tokens after its Full Blocks, whose keys are `keys` (chained from `root`)."""
        bs = self.layout.block_size
        full = len(computed) // bs
        assert len(keys) == full and len(computed) % bs
        parent = keys[-1] if keys else None
        tokens = computed[full * bs :]
        key = partial_key(parent or root, tokens)
        request.writes.append(self.writer.submit(self._put_all, [key], [parent], [block], [len(tokens)]))
        request.persisted += 1

    def _put_all(
        self,
        keys: list[bytes],
        parents: list[bytes | None],
        blocks: list[FullBlock],
        tokens: list[int] | None = None,
    ) -> int:
        """Persist blocks in chain order (`tokens`: each one's token count; None: Full Blocks);
        returns how many failed. A failed write costs a recompute later, never this step: it is
        counted and its cause logged once."""
        failed = 0
        counts = tokens or [self.layout.block_size] * len(keys)
        for key, parent, block, count in zip(keys, parents, blocks, counts, strict=True):
            try:
                self.store.put(key, parent, count, block)
            except Exception as exc:
                failed += 1
                cause = f"{type(exc).__name__} {getattr(exc.__cause__, 'errno', '')}"
                if cause not in self.persist_causes:
                    self.persist_causes.add(cause)
                    log.error("persisting blocks failed (logged once per cause): %s", exc)
        return failed

    def _finish(self, request: _DeRequest, reason: str, notify: bool = True) -> None:
        """Free the request once its writes are durable; then tell the cluster (in write order)."""
        del self.requests[request.req_id]
        writes, slots = request.writes, request.slots

        def done() -> None:
            failed = sum(write.result() for write in writes)
            if slots:
                self.buffer.release(slots)
            if notify:
                persisted = request.persisted - failed
                self.send(
                    Finished(req_id=request.req_id, reason=reason, persisted=persisted, persist_failed=failed)
                )

        self.writer.submit(done)

    def _by_seq(self, seq: Sequence) -> _DeRequest:
        return next(r for r in self.requests.values() if r.seq is seq)

    def close(self) -> None:
        self.writer.shutdown(wait=True)
        super().close()
