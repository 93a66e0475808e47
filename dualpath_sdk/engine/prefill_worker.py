"""The prefill engine (PE): reads its share of a prompt's cached blocks, prefills layer by layer, and
streams each layer's KV into the chosen DE's buffer.

Per request (PAPER.md, two load paths):
- PE read path: Full Blocks storage -> PE buffer; per layer, Layer Blocks PE buffer -> PE memory;
  after the layer, loaded + new KV -> DE buffer.
- DE read path: the DE read Full Blocks into its buffer; per layer, the PE pulls Layer Blocks from
  the DE buffer; after the layer, only the new tokens' KV goes back.
A split plan does both for different blocks. A block that fails to read (missing, corrupt) ends
the cached prefix there: the rest is computed, never a wrong token. The prefix's last block may be
a partial one (store/prefix.py): it is loaded like the others, and since this prefill computes the
rest of its rows, it always goes back to the DE buffer, whichever side read it.
Batches are packed FIFO by the compute quota (PAPER.md, Inside a PE); the request that crosses it
is prefilled in block-aligned chunks, each later chunk pulling the earlier ones' KV from the DE
buffer as on the DE read path. A batch's first request takes at least `min_chunk_tokens`: a quota
made for GPUs would otherwise cut a CPU's long prompt into a block per batch.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

import torch

from dualpath_sdk.config import SchedulerConfig
from dualpath_sdk.engine.core import check_token_ids
from dualpath_sdk.engine.messages import DeSlots, Failed, Fetch, Hello, Prefill, Prefilled, Role
from dualpath_sdk.engine.prefill import IN_FLIGHT_LAYERS, LayerIO, PrefillJob, prefill_layerwise
from dualpath_sdk.engine.sampler import sample
from dualpath_sdk.engine.sequence import Sequence
from dualpath_sdk.engine.worker import Read, Worker
from dualpath_sdk.errors import ContextTooLong
from dualpath_sdk.kv.block import KVLayout
from dualpath_sdk.model.loader import Model
from dualpath_sdk.scheduler import AttentionModel, PrefillWork, block_chunks, fit_attention_model
from dualpath_sdk.store.backend import BlockStore
from dualpath_sdk.store.buffers import BufferSlot
from dualpath_sdk.transfer import Region, RegionDescriptor, RemoteRegion, TransferOp, Transport

log = logging.getLogger(__name__)


@dataclass
class _PeRequest:
    """A request as the PE holds it, from `Prefill` to its first token."""

    task: Prefill
    slots: list[BufferSlot] = field(default_factory=list)
    reads: Future[Read] | None = None
    started: bool = False  # has its buffer slots (and its reads, if any, are running)
    de: DeSlots | None = None
    read_s: float = 0.0
    done: int = 0  # leading prompt tokens already prefilled in earlier chunks (their KV is on the DE)
    num_cached: int = 0  # prompt tokens loaded, not computed (known after the first chunk)
    bytes_read: tuple[int, int] = (0, 0)  # Full Block bytes read through the PE and the DE node
    prefill_s: float = 0.0
    solo: bool = False  # was in a batch that raised: prefilled alone, so a bad request fails alone

    @property
    def reading(self) -> bool:
        return bool(self.task.pe_reads) and self.task.mode != "oracle"


class PrefillWorker(Worker):
    """Keeps one `Fetch` outstanding (the pull model, engine/process.py): only a received `Prefill`
    clears it, and the next one goes out after the following batch and its report."""

    role: Role = "pe"

    def __init__(
        self,
        engine_id: str,
        model: Model,
        layout: KVLayout,
        store: BlockStore,
        transport: Transport,
        buffer_slots: int,
        max_batch_tokens: int,
        batching: SchedulerConfig,
    ) -> None:
        super().__init__(engine_id, model, layout, store, transport, buffer_slots)
        self.transport = transport
        self.max_batch_tokens = max_batch_tokens
        self.batching = batching  # compute_quota_s and min_chunk_tokens
        max_blocks = layout.blocks(max_batch_tokens) + buffer_slots  # a batch's blocks, cached ones included
        self.work = transport.allocate(
            f"{engine_id}-pe-work", IN_FLIGHT_LAYERS * max_blocks * layout.layer_block_nbytes
        )
        self.max_blocks = max_blocks
        self.io = LayerIO()
        self.pending: dict[str, _PeRequest] = {}
        self.remotes: dict[str, RemoteRegion] = {}  # DE buffers, attached on first use
        self.fetching = False
        self.handlers.update({Prefill: self._on_prefill, DeSlots: self.de_ready})
        self.attention, self.prefill_tps = self._profile()

    def hello(self, node: str) -> Hello:
        return replace(super().hello(node), prefill_tps=self.prefill_tps, attention=self.attention)

    @property
    def has_work(self) -> bool:
        return bool(self.ready())

    def pull(self) -> list[Fetch]:
        if self.fetching:
            return []
        self.fetching = True  # the scheduler's beta says when this PE is full
        return [Fetch(report=self.report())]

    # ---- load figures -----------------------------------------------------------------------

    @property
    def num_requests(self) -> int:
        return len(self.pending)

    @property
    def num_tokens(self) -> int:
        return sum(len(p.task.token_ids) for p in self.pending.values())

    def _profile(self) -> tuple[AttentionModel, float]:
        """Time a few synthetic prefills (as the paper profiles its engines before serving).

        Returns the fitted time model of a batch's prefill (the compute quota packs by it) and the
        prompt tokens per second of a typical agent turn, 8 blocks cached and 1 new (beta counts
        len(r), so its rate must too). The KV these prefills see is garbage; nothing leaves the PE.
        """
        bs = self.layout.block_size
        c = max(min(8, self.max_blocks - 2), 1)  # blocks: the work region bounds a batch
        n = max(min(2, self.max_blocks - c), 1)
        samples = []
        for cached, new in ((0, bs), (0, n * bs), (c * bs, bs), (c * bs, n * bs)):
            job = PrefillJob([0] * (cached + new), cached, _nothing, _nothing)
            start = time.perf_counter()
            prefill_layerwise(self.model.transformer, self.layout, [job], self.io, self._layer_memory)
            samples.append((cached, new, time.perf_counter() - start))
        _, _, typical_s = samples[2]
        return fit_attention_model(samples), (c + 1) * bs / typical_s

    # ---- tasks ------------------------------------------------------------------------------

    def _on_prefill(self, task: Prefill) -> None:
        self.fetching = False  # the Fetch is answered, whether or not the task is admitted
        self.admit(task)

    def admit(self, task: Prefill) -> None:
        """Queue the task; its reads of the PE's share of the cached blocks start once the PE
        buffer has slots for them (never blocking the loop, whose prefills free the slots)."""
        task.params.check()
        check_token_ids(task.token_ids, self.model.spec.vocab_size)
        limit = self.model.spec.max_position
        if len(task.token_ids) + task.params.max_tokens > limit:  # refused before any token streams
            raise ContextTooLong(
                f"{len(task.token_ids)} prompt tokens + max_tokens {task.params.max_tokens} exceed the "
                f"context of {limit}"
            )
        pending = _PeRequest(task)
        if pending.reading and len(task.pe_reads) > self.buffer.capacity:
            raise ContextTooLong(
                f"{len(task.pe_reads)} cached blocks exceed the PE buffer's {self.buffer.capacity} "
                "slots (buffer_slots)"
            )
        self.pending[task.req_id] = pending
        tokens = task.pe_read_tokens(self.layout.block_size) if pending.reading else []
        self.queue(task.req_id, len(tokens), sum(tokens), lambda slots: self._start(pending, slots, tokens))

    def _start(self, pending: _PeRequest, slots: list[BufferSlot], tokens: list[int]) -> None:
        """`pending` has the PE buffer slots for its reads: read its share of the cached blocks."""
        pending.started = True
        if slots:
            pending.slots = slots
            items = [(key, slot.block) for (_, key), slot in zip(pending.task.pe_reads, slots, strict=True)]
            pending.reads = self.read_blocks(items, tokens)

    def de_ready(self, slots: DeSlots) -> None:
        if slots.req_id in self.pending:
            self.pending[slots.req_id].de = slots

    def cancel(self, req_id: str) -> None:
        pending = self.pending.pop(req_id, None)
        if pending is None or self.unqueue(req_id):
            return
        if pending.reads is not None:
            pending.reads.result()  # the slots are being written: wait before handing them back
        self.buffer.release(pending.slots)

    def ready(self) -> list[_PeRequest]:
        return [
            p
            for p in self.pending.values()
            if p.started and p.de is not None and (p.reads is None or p.reads.done())
        ]

    def step(self) -> list[Prefilled | Failed]:
        """Prefill the ready requests in one layer-wise batch, and report the first token of each
        request whose last chunk it was.

        A batch that raises fails its requests, never the engine: a lone request fails with the
        error's kind (a vanished DE's TransferError is retried elsewhere by the cluster); the
        requests of a larger batch are prefilled alone from then on, so only a bad one fails."""
        batch = self._batch(self.ready())
        if not batch:
            return []
        start = time.perf_counter()
        try:
            jobs = [self._job(p, upto) for p, upto in batch]
            overlap = batch[0][0].task.mode != "basic"  # the mode is the cluster's: one per batch
            logits = prefill_layerwise(
                self.model.transformer, self.layout, jobs, self.io, self._layer_memory, overlap
            )
            last = [i for i, (p, upto) in enumerate(batch) if upto == len(p.task.token_ids)]
            firsts = sample(logits[last], [_sampling_seq(batch[i][0].task) for i in last])
        except Exception as exc:
            if len(batch) > 1:
                log.warning("a batch of %d prefills raised (%r): prefilling each alone", len(batch), exc)
                for p, _ in batch:
                    p.solo = True
                return []
            failed = batch[0][0].task.req_id
            self.cancel(failed)
            self.start_waiting()
            return [Failed.of(failed, exc)]
        elapsed = time.perf_counter() - start
        for p, upto in batch:
            p.done, p.prefill_s = upto, p.prefill_s + elapsed
            self.buffer.release(p.slots)  # the KV of every block so far is in the DE buffer now
            p.slots, p.reads = [], None
        results: list[Prefilled | Failed] = []
        for i, token in zip(last, firsts, strict=True):
            p = batch[i][0]
            del self.pending[p.task.req_id]
            bytes_pe, bytes_de = p.bytes_read
            results.append(
                Prefilled(
                    req_id=p.task.req_id,
                    first_token=token,
                    num_cached=p.num_cached,
                    read_s=p.read_s,
                    prefill_s=p.prefill_s,
                    bytes_pe=bytes_pe,
                    bytes_de=bytes_de,
                )
            )
        self.start_waiting()
        return results

    def _batch(self, ready: list[_PeRequest]) -> list[tuple[_PeRequest, int]]:
        """FIFO up to the compute quota (PAPER.md, Inside a PE) and the work region's size: each
        request with the prompt length its KV will reach (the whole prompt, or a chunk of it).

        The request that crosses the quota is chunk-prefilled, its chunk the largest that fits
        (block-aligned, at least one block): the next chunk loads the earlier ones' KV back from the
        DE buffer, as a DE-path read.
        """
        bs = self.layout.block_size
        ready = next(([p] for p in ready if p.solo), ready)
        work = []
        for p in ready:
            cached = p.done or p.task.cached_tokens
            work.append(PrefillWork(p.task.req_id, cached, len(p.task.token_ids) - cached))
        quota, floor = self.batching.compute_quota_s, self.batching.min_chunk_tokens
        ends = block_chunks(work, self.attention, quota, bs, self.max_blocks, self.max_batch_tokens, floor)
        return list(zip(ready, ends, strict=False))

    # ---- one request's loads and sends -------------------------------------------------------------

    def _job(self, p: _PeRequest, upto: int) -> PrefillJob:
        """Prefill `p`'s prompt up to `upto` on top of its cached blocks.

        The first chunk loads the PE's reads from its slots and the DE's reads from the DE buffer;
        a later chunk loads every earlier block from the DE buffer. Full Blocks the DE buffer holds
        intact are not sent back; a partial one is, with the rows this prefill adds."""
        assert p.de is not None
        task, bs = p.task, self.layout.block_size
        layer_bytes, token_bytes = self.layout.layer_block_nbytes, self.layout.bytes_per_token
        tokens = task.token_ids[:upto]
        if task.mode == "oracle":  # the I/O-free ceiling: as if every cached layer were already here
            cached = p.done or task.cached_tokens
            p.num_cached = p.num_cached or cached
            return PrefillJob(tokens, cached, _nothing, _nothing)
        if p.done:
            from_pe, cached = 0, p.done
        else:
            read = p.reads.result() if p.reads is not None else Read(0, 0.0)
            pe_valid, p.read_s = read.valid, read.seconds
            n_pe = len(task.pe_reads)
            from_pe = min(n_pe, pe_valid)
            loaded = pe_valid if pe_valid < n_pe else n_pe + p.de.valid_reads
            cached = p.num_cached = min(loaded * bs, task.cached_tokens)
            pe_tokens = min(from_pe * bs, cached)
            p.bytes_read = (pe_tokens * token_bytes, (cached - pe_tokens) * token_bytes)
        loaded = self.layout.blocks(cached)  # blocks that hold cached KV, the last one perhaps partial
        remote = self._remote(p.de.buffer)
        offsets = p.de.offsets
        # the DE holds the rest intact
        sent = [i for i in range(self.layout.blocks(upto)) if not from_pe <= i < cached // bs]
        work = self.work

        def load_layer(layer: int, kv: torch.Tensor) -> None:
            for i in range(from_pe):
                kv[i].copy_(p.slots[i].block.layer(layer))
            if loaded > from_pe:
                first = _offset_in(work, kv[from_pe])
                ops = [
                    TransferOp(
                        work,
                        first + (i - from_pe) * layer_bytes,
                        remote,
                        offsets[i] + layer * layer_bytes,
                        layer_bytes,
                    )
                    for i in range(from_pe, loaded)
                ]
                self.transport.read_batch(ops, "kv").wait()

        def send_layer(layer: int, kv: torch.Tensor) -> None:
            first = _offset_in(work, kv[0])
            ops = [
                TransferOp(
                    work, first + i * layer_bytes, remote, offsets[i] + layer * layer_bytes, layer_bytes
                )
                for i in sent
            ]
            self.transport.write_batch(ops, "kv").wait()

        return PrefillJob(tokens, cached, load_layer, send_layer)

    def _remote(self, descriptor: RegionDescriptor) -> RemoteRegion:
        if descriptor.endpoint not in self.remotes:
            self.remotes[descriptor.endpoint] = self.transport.attach(descriptor)
        return self.remotes[descriptor.endpoint]

    def _layer_memory(self, layer: int, blocks: int) -> torch.Tensor:
        """Layer `layer`'s working KV, a view into the registered work region (a ring of 3 layers)."""
        per_layer = self.max_blocks * self.layout.layer_block_nbytes
        raw = self.work.tensor[(layer % IN_FLIGHT_LAYERS) * per_layer :][
            : blocks * self.layout.layer_block_nbytes
        ]
        return raw.view(self.layout.dtype).view(blocks, *self.layout.layer_block_shape)

    def close(self) -> None:
        super().close()
        self.io.close()
        self.work.close()
        for remote in self.remotes.values():
            remote.close()


def _nothing(layer: int, kv: torch.Tensor) -> None:
    pass


def _offset_in(region: Region, view: torch.Tensor) -> int:
    return view.data_ptr() - region.tensor.data_ptr()


def _sampling_seq(task: Prefill) -> Sequence:
    """The request as `sample` takes it: its sampling params and its seeded generator."""
    return Sequence(task.token_ids, task.params, b"", None)
