"""Layer-wise streaming overlap: a turn's prefill with its cached KV loaded layer by layer over the
transport, beside the same prefill with the KV already in place.

The turn: `cached` tokens of history and `new` tokens, on the default model. The link is set so
that loading all cached layers takes about as long as the prefill computes (the case where
overlap matters); `hidden` is the share of the load time that the prefill does not see:
(in place + load alone - streamed) / load alone. Both read paths are measured: on the PE path the
PE sends loaded + new KV of each layer to the DE buffer; on the DE path only the new tokens' KV.
Basic (the paper's baseline) runs the PE path with each layer's load, compute and send in turn.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from dualpath_sdk.config import TransferConfig
from dualpath_sdk.engine.core import kv_layout
from dualpath_sdk.engine.prefill import IN_FLIGHT_LAYERS, LayerIO, PrefillJob, prefill_layerwise
from dualpath_sdk.model.loader import load_model
from dualpath_sdk.transfer import RemoteRegion, TransferOp, open_transport

Figures = dict[str, float | bool]


def overlap_section(quick: bool) -> Figures:
    cached, new, rounds = (1024, 256, 2) if quick else (4096, 512, 3)
    model = load_model()
    layout = kv_layout(model, 64)
    bs, layer_bytes = layout.block_size, layout.layer_block_nbytes
    n_cached, n_blocks = cached // bs, -(-(cached + new) // bs)
    tokens = torch.randint(0, model.spec.vocab_size, (cached + new,)).tolist()
    in_place = [torch.randn(n_blocks, *layout.layer_block_shape) for _ in range(layout.num_layers)]
    io = LayerIO()

    def prefill(
        job: PrefillJob, memory: Callable[[int, int], torch.Tensor] | None = None, overlap: bool = True
    ) -> float:
        start = time.perf_counter()
        prefill_layerwise(model.transformer, layout, [job], io, memory, overlap)
        return time.perf_counter() - start

    def nothing(layer: int, kv: torch.Tensor) -> None:
        pass

    baseline = min(
        prefill(PrefillJob(tokens, cached, nothing, nothing), lambda layer, _: in_place[layer])
        for _ in range(rounds)
    )
    load_total = n_cached * layer_bytes * layout.num_layers
    rate = load_total / baseline  # loading alone takes as long as computing
    with tempfile.TemporaryDirectory() as tmp:
        transport = open_transport(TransferConfig(link_bps=rate, shm_dir=Path(tmp)), node="bench-pe")
        buffer = transport.allocate("buffer", n_blocks * layout.full_block_nbytes)
        de_buffer = transport.allocate("de-buffer", n_blocks * layout.full_block_nbytes)
        work = transport.allocate("work", IN_FLIGHT_LAYERS * n_blocks * layer_bytes)
        remote, de_remote = transport.attach(buffer.descriptor), transport.attach(de_buffer.descriptor)

        def memory(layer: int, blocks: int) -> torch.Tensor:
            raw = work.tensor[(layer % IN_FLIGHT_LAYERS) * n_blocks * layer_bytes :][: blocks * layer_bytes]
            return raw.view(layout.dtype).view(blocks, *layout.layer_block_shape)

        def offset(view: torch.Tensor) -> int:
            return view.data_ptr() - work.tensor.data_ptr()

        def ops(layer: int, kv: torch.Tensor, peer: RemoteRegion, blocks: range) -> list[TransferOp]:
            """Layer `layer` of `blocks`: working memory <-> the Full Block slots of `peer`."""
            base = offset(kv)
            return [
                TransferOp(
                    work,
                    base + i * layer_bytes,
                    peer,
                    i * layout.full_block_nbytes + layer * layer_bytes,
                    layer_bytes,
                )
                for i in blocks
            ]

        def load(layer: int, kv: torch.Tensor) -> None:
            transport.read_batch(ops(layer, kv, remote, range(n_cached))).wait()

        def sender(first_block: int) -> Callable[[int, torch.Tensor], None]:
            def send(layer: int, kv: torch.Tensor) -> None:
                transport.write_batch(ops(layer, kv, de_remote, range(first_block, n_blocks))).wait()

            return send

        start = time.perf_counter()
        for layer in range(layout.num_layers):
            load(layer, memory(layer, n_cached))
        load_alone = time.perf_counter() - start
        streamed = {
            path: min(
                prefill(PrefillJob(tokens, cached, load, sender(first)), memory, overlap)
                for _ in range(rounds)
            )
            for path, first, overlap in (("basic", 0, False), ("pe", 0, True), ("de", n_cached, True))
        }
        for region in (buffer, de_buffer, work):
            region.close()
        transport.close()
    io.close()

    table = Table(title=f"layer-wise overlap: {cached} cached + {new} new tokens, link {rate / 1e6:.0f} MB/s")
    for column in ("", "seconds", "vs KV in place", "load hidden"):
        table.add_column(column, justify="right")
    table.add_row("KV in place (compute only)", f"{baseline:.3f}", "1.00x", "")
    table.add_row("load alone (no compute)", f"{load_alone:.3f}", "", "")
    figures: Figures = {"overlap_compute_s": round(baseline, 4), "overlap_load_s": round(load_alone, 4)}
    for path, seconds in streamed.items():
        # on the PE path the sends (loaded + new KV) outweigh the loads: what they add shows here too
        hidden = max(0.0, min(1.0, (baseline + load_alone - seconds) / load_alone))
        label = "PE path, basic (no overlap)" if path == "basic" else f"{path.upper()} path, streamed"
        table.add_row(label, f"{seconds:.3f}", f"{seconds / baseline:.2f}x", f"{hidden:.0%}")
        figures[f"overlap_{path}_s"] = round(seconds, 4)
        figures[f"overlap_{path}_hidden"] = round(hidden, 3)
    Console().print(table)
    return figures
