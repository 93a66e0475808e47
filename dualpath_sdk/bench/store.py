"""Store benchmark: fs Full Block writes and reads beside the raw device, and the limiter's accuracy.

The baseline runs in the same process on the same file system: one file of the same total size,
written then read sequentially with O_DIRECT in block-sized I/Os (what `dd oflag=direct` /
`iflag=direct` measure). The fs backend then writes and reads the same bytes as Full Blocks with 1,
4 and 16 threads, through O_DIRECT from page-aligned buffers, so the page cache flatters neither.
Set DUALPATH_BENCH_DIR to measure another file system (default: the current directory's).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from dualpath_sdk.kv.block import FullBlock, KVLayout
from dualpath_sdk.kv.keys import block_keys, namespace_key
from dualpath_sdk.store.aligned import aligned_empty, byte_view
from dualpath_sdk.store.fs import FsStore
from dualpath_sdk.store.limiter import StorageNicLimiter

# 4 MiB Full Blocks: 32 layers x 64 tokens x 8 KV heads x 64 dims, fp16.
LAYOUT = KVLayout(num_layers=32, block_size=64, num_kv_heads=8, head_dim=64, dtype=torch.float16)
PARALLELISM = (1, 4, 16)


def _rate(nbytes: int, fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return nbytes / (time.perf_counter() - start)


def _raw_write(path: Path, buf: torch.Tensor, chunks: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        view = byte_view(buf)
        for i in range(chunks):
            os.pwrite(fd, view, i * len(view))
        os.fsync(fd)
    finally:
        os.close(fd)


def _raw_read(path: Path, buf: torch.Tensor, chunks: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        view = byte_view(buf)
        for i in range(chunks):
            os.preadv(fd, [view], i * len(view))
    finally:
        os.close(fd)


def main(quick: bool) -> dict[str, float | bool]:
    blocks = 96 if quick else 384
    nbytes = LAYOUT.full_block_nbytes
    total = blocks * nbytes
    parent = Path(os.environ.get("DUALPATH_BENCH_DIR", "."))
    workdir = Path(tempfile.mkdtemp(prefix=".bench-store-", dir=parent))
    src = aligned_empty(nbytes)
    src.random_(0, 256)
    dst = aligned_empty(total)
    figures: dict[str, float | bool] = {"block_bytes": nbytes, "total_bytes": total}
    try:
        figures["raw_write_MBps"] = _rate(total, lambda: _raw_write(workdir / "raw.bin", src, blocks)) / 1e6
        figures["raw_read_MBps"] = _rate(total, lambda: _raw_read(workdir / "raw.bin", src, blocks)) / 1e6
        (workdir / "raw.bin").unlink()
        for n in PARALLELISM:
            write, read, figures["direct_io"] = _fs_round(workdir / f"store-{n}", n, blocks, src, dst)
            figures[f"fs_write_MBps_{n}"], figures[f"fs_read_MBps_{n}"] = write / 1e6, read / 1e6
        figures.update(_limiter(workdir, figures))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    best_read = max(figures[f"fs_read_MBps_{n}"] for n in PARALLELISM)
    best_write = max(figures[f"fs_write_MBps_{n}"] for n in PARALLELISM)
    figures["read_ratio"] = best_read / figures["raw_read_MBps"]
    figures["write_ratio"] = best_write / figures["raw_write_MBps"]
    figures["read_target_met"] = figures["read_ratio"] >= 0.85
    figures["write_target_met"] = figures["write_ratio"] >= 0.80
    figures["limiter_target_met"] = abs(figures["limiter_error"]) <= 0.05
    _print(figures)
    return figures


def _fs_round(
    root: Path, n: int, blocks: int, src: torch.Tensor, dst: torch.Tensor
) -> tuple[float, float, bool]:
    """Write `blocks` Full Blocks with `n` threads, read them back with `n` threads: (write B/s, read B/s)."""
    nbytes = LAYOUT.full_block_nbytes
    keys = block_keys(namespace_key(f"bench-{n}", "float16", 64), list(range(blocks * 64)), 64)
    store = FsStore(root, read_threads=n)
    block = FullBlock(LAYOUT, src)
    with ThreadPoolExecutor(n) as writers:
        write = _rate(
            blocks * nbytes, lambda: list(writers.map(lambda k: store.put(k, None, 64, block), keys))
        )
    items = [(k, FullBlock(LAYOUT, dst[i * nbytes : (i + 1) * nbytes])) for i, k in enumerate(keys)]
    hits: list[bool] = []
    read = _rate(blocks * nbytes, lambda: hits.extend(store.read_many(items)))
    assert all(hits) and torch.equal(items[-1][1].raw, src), "a benchmark read came back wrong"
    direct = store._direct
    store.close()
    shutil.rmtree(root)
    return write, read, direct


def _limiter(workdir: Path, figures: dict[str, float | bool]) -> dict[str, float]:
    """Cap reads at a third of the slowest fs read rate (so the cap binds however the device varies)
    and measure what 4 readers get over about two seconds."""
    rate = min(float(figures[f"fs_read_MBps_{n}"]) for n in PARALLELISM) * 1e6 / 3
    nbytes = LAYOUT.full_block_nbytes
    blocks = max(8, int(2.0 * rate / nbytes))
    src = FullBlock(LAYOUT, aligned_empty(nbytes))
    keys = block_keys(namespace_key("bench-limiter", "float16", 64), list(range(blocks * 64)), 64)
    with StorageNicLimiter(f"bench-{os.getpid()}", read_bps=rate, burst_s=0.01) as limiter:
        store = FsStore(workdir / "store-limited", read_threads=4, limiter=limiter)
        for key in keys:
            store.put(key, None, 64, src)
        dst = aligned_empty(blocks * nbytes)
        items = [(k, FullBlock(LAYOUT, dst[i * nbytes : (i + 1) * nbytes])) for i, k in enumerate(keys)]
        # Bytes granted per read include the header page and padding: the SNIC carries them too.
        achieved = _rate(blocks * (nbytes + 4096), lambda: store.read_many(items))
        store.close()
    limiter.path.unlink(missing_ok=True)
    return {
        "limiter_set_MBps": rate / 1e6,
        "limiter_MBps": achieved / 1e6,
        "limiter_error": achieved / rate - 1,
    }


def _print(f: dict[str, float | bool]) -> None:
    table = Table(
        title=f"fs store, {LAYOUT.full_block_nbytes >> 20} MiB Full Blocks, O_DIRECT={f['direct_io']}"
    )
    for col in ("what", "MB/s", "vs raw"):
        table.add_column(col, justify="right" if col != "what" else "left")
    table.add_row("raw sequential write (O_DIRECT)", f"{f['raw_write_MBps']:.0f}", "1.00")
    table.add_row("raw sequential read (O_DIRECT)", f"{f['raw_read_MBps']:.0f}", "1.00")
    for n in PARALLELISM:
        w = float(f[f"fs_write_MBps_{n}"])
        table.add_row(f"fs put, {n} writers", f"{w:.0f}", f"{w / float(f['raw_write_MBps']):.2f}")
    for n in PARALLELISM:
        r = float(f[f"fs_read_MBps_{n}"])
        table.add_row(f"fs read_many, {n} readers", f"{r:.0f}", f"{r / float(f['raw_read_MBps']):.2f}")
    table.add_row(
        f"limiter set to {f['limiter_set_MBps']:.0f}",
        f"{f['limiter_MBps']:.0f}",
        f"error {float(f['limiter_error']):+.1%}",
    )
    Console().print(table)
