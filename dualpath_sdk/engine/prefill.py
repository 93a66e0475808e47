"""Layer-wise prefill (PAPER.md): the PE holds only the layers in flight.

For each layer k of a batch of jobs: layer k's cached KV is in place before layer k runs (loaded
while layer k-1 computed), the layer runs over cached + new tokens, and layer k's KV is handed on
(to the DE buffer) before its memory is reused. A job says where its cached Layer Blocks come from
and where its results go; this module only computes and overlaps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from dualpath_sdk.kv.block import KVLayout
from dualpath_sdk.model.attention import AttentionBatch, SeqSlice
from dualpath_sdk.model.transformer import Transformer

IN_FLIGHT_LAYERS = 3  # computing, the next one loading, the previous one sending


@dataclass
class LayerIO:
    """The threads that move a prefill's layers: one loads, one sends."""

    loads: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="layer-load")
    )
    sends: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="layer-send")
    )

    def close(self) -> None:
        self.loads.shutdown(wait=True)
        self.sends.shutdown(wait=True)


@dataclass
class PrefillJob:
    token_ids: Sequence[int]  # the whole prompt
    num_cached: int  # leading tokens whose KV is loaded (the last loaded block may be partial)
    load_layer: Callable[[int, torch.Tensor], None]  # fill `[ceil(num_cached / bs), ...]` with layer k's
    send_layer: Callable[[int, torch.Tensor], None]  # layer k's KV of all the job's blocks, once computed

    @property
    def num_new(self) -> int:
        return len(self.token_ids) - self.num_cached


def prefill_layerwise(
    model: Transformer,
    layout: KVLayout,
    jobs: Sequence[PrefillJob],
    io: LayerIO,
    layer_memory: Callable[[int, int], torch.Tensor] | None = None,
    overlap: bool = True,
) -> torch.Tensor:
    """Prefill `jobs` together; returns the last position's fp32 logits, `[len(jobs), vocab]`.

    Layer k+1's loads run while layer k computes and layer k-1's sends go out (loads and sends on
    their own threads: different links). Sends are complete when this returns. `layer_memory(layer,
    blocks)` gives a layer's working KV: a ring of IN_FLIGHT_LAYERS views suffices, because the load
    into a ring slot first waits for the send that last used it. `overlap=False` is the paper's
    Basic: each layer's load, compute and send in turn, nothing hidden.
    """
    bs = layout.block_size
    blocks = [layout.blocks(len(job.token_ids)) for job in jobs]
    bases = [sum(blocks[:i]) for i in range(len(jobs))]
    batch = AttentionBatch.build(
        [
            SeqSlice(job.num_cached, job.num_new, range(b, b + n))
            for job, b, n in zip(jobs, bases, blocks, strict=True)
        ],
        bs,
    )
    batch.cos, batch.sin = model.rope(batch.positions)
    hidden = model.embed(torch.tensor([t for job in jobs for t in job.token_ids[job.num_cached :]]))
    shape = (sum(blocks), *layout.layer_block_shape)

    def load(layer: int) -> torch.Tensor:
        kv = torch.zeros(shape, dtype=layout.dtype) if layer_memory is None else layer_memory(layer, shape[0])
        for job, base in zip(jobs, bases, strict=True):
            if job.num_cached:  # a partial last block: its rows past num_cached are computed here
                job.load_layer(layer, kv[base : base + layout.blocks(job.num_cached)])
        return kv

    def send(layer: int, kv: torch.Tensor) -> None:
        for job, base, n in zip(jobs, bases, blocks, strict=True):
            job.send_layer(layer, kv[base : base + n])

    sends: list[Future[None]] = []

    def load_after_send(layer: int) -> torch.Tensor:
        if layer >= IN_FLIGHT_LAYERS:
            sends[layer - IN_FLIGHT_LAYERS].result()  # the ring slot's last user has left
        return load(layer)

    if not overlap:
        for layer in range(layout.num_layers):
            kv = load(layer)
            hidden = model.layer(layer, hidden, batch, kv)
            send(layer, kv)
        return model.logits(hidden[torch.tensor([job.num_new for job in jobs]).cumsum(0) - 1])

    pending: Future[torch.Tensor] = io.loads.submit(load, 0)
    for layer in range(layout.num_layers):
        kv = pending.result()
        if layer + 1 < layout.num_layers:
            pending = io.loads.submit(load_after_send, layer + 1)
        hidden = model.layer(layer, hidden, batch, kv)
        sends.append(io.sends.submit(send, layer, kv))
    ends = torch.tensor([job.num_new for job in jobs]).cumsum(0) - 1
    logits = model.logits(hidden[ends])
    for future in sends:
        future.result()
    return logits
