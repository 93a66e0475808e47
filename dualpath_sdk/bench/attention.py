"""Attention over the paged KV pool: the paged paths beside the gather path they replace, one run.

Default model, fp32, one `EngineCore` (its real steps: schedule, forward, sample). History KV is
random (attention's cost does not depend on its values) and is imported into the pool through the
engine's own CachedPrefix path; token ids are random and differ per sequence, so no two sequences
share a block and each reads its own KV. Columns: `gather` (index_select + SDPA), `paged` (torch's
SDPA flash kernel over block runs, no copy) and `kernel` (csrc/, when it builds here), all in the
same run on the same sequences.

- decode TPOT: B sequences over a history, then decode steps that cycle through the paths one step
  each (same pool, contexts a token apart); the median step per path.
- prefill: one engine step of 400 new tokens whose history is already in the pool (the shared blocks
  of an earlier turn), each path in turn, best of `repeats`.
- a turn's TTFT over a reused history: its KV imported from Full Blocks layer by layer just before
  each layer runs (the engine's side of a load; the read from storage is not in it) beside the I/O-free
  oracle, the same history already in the pool; on the default path.
- cold prefill (full run only): a whole prompt in one forward, no history, best of 2; then the same
  prompts through a 1P1D cluster's PE (TTFT of a fresh session, default path), with the compute quota
  alone (`min_chunk_tokens=0`: a CPU's 300 ms fits one block, so 64-token chunks that each load back
  every earlier chunk's KV) and with the chunk floor, each over the engine core's time.
- memory traffic per decoded token: the weights' and the KV's bytes (the floor), the bytes each path
  moves by construction (gather copies the KV and reads the copy again), and the floor's time at this
  run's measured memcpy rate beside the measured TPOT.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from dualpath_sdk.config import ClusterConfig, EngineConfig, SchedulerConfig, StoreConfig
from dualpath_sdk.engine.core import EngineCore, kv_layout
from dualpath_sdk.engine.sequence import FullBlockPrefix, SamplingParams, Sequence
from dualpath_sdk.kv.block import FullBlock
from dualpath_sdk.model.attention import backend_for, force_backend
from dualpath_sdk.model.kernel import kernel_op
from dualpath_sdk.model.loader import Model, load_model

BLOCK = 64
NEW = 400  # new tokens of a turn's prefill
_console = Console(width=None if sys.stdout.isatty() else 120)  # tables of 6 columns, unwrapped in a file


class RandomHistory:
    """A CachedPrefix of `num_tokens` of random KV (one tensor, the same for every layer)."""

    def __init__(self, engine: EngineCore, num_tokens: int, generator: torch.Generator) -> None:
        layout = engine.layout
        self.num_tokens = num_tokens
        shape = (layout.blocks(num_tokens), *layout.layer_block_shape)
        self._kv = torch.randn(shape, generator=generator, dtype=layout.dtype)

    def layer(self, index: int) -> torch.Tensor:
        return self._kv


class Bench:
    def __init__(self, model: Model, paths: list[str]) -> None:
        self.model = model
        self.paths = paths
        self.g = torch.Generator().manual_seed(0)

    def tokens(self, n: int) -> list[int]:
        return torch.randint(0, self.model.spec.vocab_size, (n,), generator=self.g).tolist()

    def engine(self, blocks: int) -> EngineCore:
        config = EngineConfig(block_size=BLOCK, num_blocks=blocks, max_batch_tokens=8192, max_running=8)
        return EngineCore(self.model, config)

    def decode(self, batch: int, history: int, steps: int) -> dict[str, Timing]:
        """Median decode step (s) per path: `batch` sequences over `history` tokens of KV each."""
        tail = 16
        engine = self.engine(batch * (-(-(history + tail + steps + 4) // BLOCK) + 1))
        prefix = RandomHistory(engine, history, self.g)
        params = SamplingParams(max_tokens=steps + 4, ignore_eos=True)
        for _ in range(batch):
            engine.add(self.tokens(history + tail), params, prefix=prefix)
        engine.step()  # imports the histories, prefills the tails
        engine.step()  # a warm-up decode step
        times: dict[str, list[Timing]] = {p: [] for p in self.paths}
        for i in range(steps):
            path = self.paths[i % len(self.paths)]
            with force_backend(path):
                times[path].append(_timed(engine.step))
        return {p: Timing.median(t) for p, t in times.items()}

    def prefill(self, history: int, repeats: int) -> dict[str, Timing]:
        """Best step (s) per path prefilling NEW tokens over `history` tokens already in the pool."""
        engine = self.engine(-(-(history + NEW + 1) // BLOCK) * (len(self.paths) + 1) + 2)
        shared = self.tokens(history)
        _finish(
            engine,
            engine.add(
                shared + self.tokens(1),
                SamplingParams(max_tokens=1),
                prefix=RandomHistory(engine, history, self.g),
            ),
        )
        runs: dict[str, list[Timing]] = {p: [] for p in self.paths}
        for _ in range(repeats):
            for path in self.paths:
                seq = engine.add(shared + self.tokens(NEW), SamplingParams(max_tokens=1))
                with force_backend(path):
                    runs[path].append(_timed(partial(_finish, engine, seq)))
                assert seq.num_cached == history, "the history must come from the pool"
        return {p: Timing.best(r) for p, r in runs.items()}

    def turn(self, history: int, repeats: int) -> dict[str, Timing]:
        """(TTFT with the history imported from Full Blocks, TTFT with it in the pool), default path."""
        engine = self.engine(-(-(history + NEW + 1) // BLOCK) * 3 + 2)
        blocks = [FullBlock.empty(engine.layout) for _ in range(engine.layout.blocks(history))]
        for block in blocks:
            block.tensor.normal_(generator=self.g)
        prefix = FullBlockPrefix(blocks)
        shared = self.tokens(history)
        _finish(engine, engine.add(shared + self.tokens(1), SamplingParams(max_tokens=1), prefix=prefix))
        runs: dict[str, list[Timing]] = {"imported": [], "oracle": []}
        for _ in range(repeats):
            seq = engine.add(self.tokens(history + NEW), SamplingParams(max_tokens=1), prefix=prefix)
            runs["imported"].append(_timed(partial(_finish, engine, seq)))
            seq = engine.add(shared + self.tokens(NEW), SamplingParams(max_tokens=1))
            runs["oracle"].append(_timed(partial(_finish, engine, seq)))
            assert seq.num_cached == history, "the oracle's history must come from the pool"
        return {k: Timing.best(r) for k, r in runs.items()}

    def cold(self, length: int, repeats: int) -> dict[str, Timing]:
        """Best time per path of a whole `length`-token prompt in one forward, nothing cached."""
        engine = self.engine(-(-(length + 1) // BLOCK) + 1)
        runs: dict[str, list[Timing]] = {p: [] for p in self.paths}
        for _ in range(repeats):
            for path in self.paths:
                seq = engine.add(self.tokens(length), SamplingParams(max_tokens=1))
                with force_backend(path):
                    runs[path].append(_timed(partial(_finish, engine, seq)))
        return {p: Timing.best(r) for p, r in runs.items()}


@dataclass(frozen=True)
class Timing:
    """Wall seconds, and this thread's CPU seconds: on a shared machine the second is not inflated by
    waiting for a core (both are by memory-bandwidth contention); on an idle one they agree."""

    wall: float
    cpu: float

    @staticmethod
    def best(runs: list[Timing]) -> Timing:
        return Timing(min(r.wall for r in runs), min(r.cpu for r in runs))

    @staticmethod
    def median(runs: list[Timing]) -> Timing:
        return Timing(statistics.median(r.wall for r in runs), statistics.median(r.cpu for r in runs))


def cold_through_cluster(lengths: list[int], floor: int, vocab: int) -> dict[int, float]:
    """TTFT of each cold prompt through a fresh 1P1D cluster whose PE chunks at `floor` tokens at least."""
    from dualpath_sdk.api.cluster import Cluster

    rng = torch.Generator().manual_seed(7)
    with tempfile.TemporaryDirectory() as root:
        store, scheduler = StoreConfig(root=Path(root)), SchedulerConfig(min_chunk_tokens=floor)
        with Cluster(ClusterConfig(store=store, scheduler=scheduler)) as cluster:
            out = {}
            for n in lengths:
                prompt = torch.randint(0, vocab, (n,), generator=rng).tolist()
                out[n] = cluster.session().step_tokens(prompt, max_tokens=1).timings.ttft_s
            return out


def _timed(run: Callable[[], object]) -> Timing:
    wall, cpu = time.perf_counter(), time.thread_time()
    run()
    return Timing(time.perf_counter() - wall, time.thread_time() - cpu)


def _finish(engine: EngineCore, seq: Sequence) -> None:
    while seq.finish_reason is None:
        engine.step()


def _copy_rate() -> float:
    """Bytes per second a plain memcpy of 256 MB moves here now (read + write), best of 3."""
    src = torch.ones(64 << 20)
    dst = torch.empty_like(src)
    best = Timing.best([_timed(lambda: dst.copy_(src)) for _ in range(3)])
    return 2 * src.numel() * src.element_size() / best.wall


def _weight_bytes(model: Model) -> int:
    """Bytes of weights one decode step reads: every layer's, the final norm and the LM head."""
    return model.transformer.step_bytes


def main(quick: bool) -> dict:
    steps, repeats = (6, 1) if quick else (30, 3)
    model = load_model(weights="fp32")  # the figures of earlier runs: fp32 weights and KV
    paths = ["gather", "paged"] + (["kernel"] if kernel_op() is not None else [])
    default = backend_for(torch.device("cpu")).name
    bench = Bench(model, paths)
    bench.decode(1, 256, len(paths))  # warm-up: first calls, allocator, caches
    contexts = {"2K": (2048, 2048), "8K": (8000, 7744)}  # (decode history, prefill history)
    rows: list[tuple[str, str, dict[str, Timing]]] = []
    for name, (decode_history, prefill_history) in contexts.items():
        for batch in (1, 8):
            label = f"decode TPOT, batch {batch}, ctx {decode_history + 16}+"
            rows.append((label, f"decode_b{batch}_{name}", bench.decode(batch, decode_history, steps)))
        label = f"prefill {NEW} new over {prefill_history} cached"
        rows.append((label, f"prefill_{name}", bench.prefill(prefill_history, repeats)))
    cold_lengths = [] if quick else [2041, 6583]
    for length in cold_lengths:
        rows.append((f"cold prefill, {length} tokens", f"cold_{length}", bench.cold(length, 2)))
    turn = bench.turn(7744, repeats)
    floors = {"quota alone": 0, "chunk floor": SchedulerConfig().min_chunk_tokens}
    vocab = model.spec.vocab_size
    through = {n: cold_through_cluster(cold_lengths, f, vocab) for n, f in floors.items() if cold_lengths}

    threads = torch.get_num_threads()
    table = Table(title=f"attention: default model, fp32, {threads} thread(s); default path: {default}")
    table.add_column("")
    for path in paths:
        table.add_column(f"{path} (wall)", justify="right")
    for path in paths[1:]:
        table.add_column(f"{path} / gather: wall (cpu)", justify="right")
    figures: dict[str, float | int | str] = {"default_path": default}
    for label, key, times in rows:
        ratios = {
            p: (times[p].wall / times["gather"].wall, times[p].cpu / times["gather"].cpu) for p in paths
        }
        table.add_row(
            label,
            *(_seconds(times[p].wall) for p in paths),
            *(f"{w:.2f}x ({c:.2f}x)" for w, c in (ratios[p] for p in paths[1:])),
        )
        for p in paths:
            figures[f"{key}_{p}_s"] = round(times[p].wall, 4)
            figures[f"{key}_{p}_cpu_s"] = round(times[p].cpu, 4)
        for p in paths[1:]:
            figures[f"{key}_{p}_ratio"], figures[f"{key}_{p}_cpu_ratio"] = (round(r, 3) for r in ratios[p])
    _console.print(table)

    imported, oracle = turn["imported"], turn["oracle"]
    ttft = Table(title=f"a turn's TTFT: {NEW} new tokens over a reused 7744-token history ({default})")
    for column in ("history KV", "TTFT (wall)", "/ oracle: wall (cpu)"):
        ttft.add_column(column, justify="right")
    ttft.add_row(
        "imported from Full Blocks, layer by layer",
        _seconds(imported.wall),
        f"{imported.wall / oracle.wall:.2f}x ({imported.cpu / oracle.cpu:.2f}x)",
    )
    ttft.add_row("in the pool already (I/O-free oracle)", _seconds(oracle.wall), "1.00x")
    _console.print(ttft)
    figures |= {
        "turn_imported_s": round(imported.wall, 3),
        "turn_oracle_s": round(oracle.wall, 3),
        "turn_ratio": round(imported.wall / oracle.wall, 3),
        "turn_cpu_ratio": round(imported.cpu / oracle.cpu, 3),
    }

    weights, kv = _weight_bytes(model), 8016 * kv_layout(model, BLOCK).bytes_per_token
    rate = _copy_rate()
    floor_s = (weights + kv) / rate
    moves = {"gather": weights + 3 * kv, "paged": weights + kv, "kernel": weights + kv}
    traffic = Table(title="memory traffic per decoded token, batch 1, ctx 8016+ (the floor: weights + KV)")
    for column in ("", "MB moved (by construction)", "TPOT (wall)", "TPOT / floor time"):
        traffic.add_column(column, justify="right")
    traffic.add_row("weights", f"{weights / 1e6:.0f}", "", "")
    traffic.add_row("KV", f"{kv / 1e6:.0f}", "", "")
    traffic.add_row(
        f"floor at this run's memcpy rate, {rate / 1e9:.1f} GB/s",
        f"{(weights + kv) / 1e6:.0f}",
        _seconds(floor_s),
        "1.00x",
    )
    tpot = next(times for _, key, times in rows if key == "decode_b1_8K")
    for p in paths:
        traffic.add_row(
            p, f">= {moves[p] / 1e6:.0f}", _seconds(tpot[p].wall), f"{tpot[p].wall / floor_s:.2f}x"
        )
    _console.print(traffic)
    figures |= {
        "weights_mb": round(weights / 1e6, 1),
        "kv_8k_mb": round(kv / 1e6, 1),
        "memcpy_gb_s": round(rate / 1e9, 2),
        "floor_ms": round(floor_s * 1e3, 2),
    }
    for p in paths:
        figures[f"traffic_{p}_mb"] = round(moves[p] / 1e6, 1)
        figures[f"tpot_over_floor_{p}"] = round(tpot[p].wall / floor_s, 3)
    if cold_lengths:
        figures |= _cold_table(rows, default, floors, through)
    return figures


def _cold_table(
    rows: list[tuple[str, str, dict[str, Timing]]],
    default: str,
    floors: dict[str, int],
    through: dict[str, dict[int, float]],
) -> dict[str, float]:
    table = Table(title=f"cold prefill: one EngineCore forward beside a 1P1D cluster's PE ({default})")
    for column in ("prompt", "engine core", *(f"cluster, {n} ({f} tokens)" for n, f in floors.items())):
        table.add_column(column, justify="right")
    figures = {}
    for n in through["chunk floor"]:
        core = next(times[default].wall for _, key, times in rows if key == f"cold_{n}")
        cells = [f"{through[name][n]:.2f} s ({through[name][n] / core:.2f}x)" for name in floors]
        table.add_row(f"{n} tokens", _seconds(core), *cells)
        for name, f in floors.items():
            figures[f"cold_{n}_cluster_floor{f}_s"] = round(through[name][n], 3)
            figures[f"cold_{n}_cluster_floor{f}_ratio"] = round(through[name][n] / core, 3)
    _console.print(table)
    return figures


def _seconds(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"
