"""The persistent KV store: one suite over every backend, then the fs backend's crash, corruption,
multi-process and disk-full behaviour with real files, real processes and a real tmpfs."""

from __future__ import annotations

import errno
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch

from dualpath_sdk.config import MooncakeConfig
from dualpath_sdk.errors import InvalidInput, StorageError
from dualpath_sdk.kv.block import FullBlock, KVLayout
from dualpath_sdk.kv.keys import BlockKey, block_keys, namespace_key, partial_key
from dualpath_sdk.store.aligned import aligned_empty
from dualpath_sdk.store.backend import BlockStore
from dualpath_sdk.store.fs import FsStore
from dualpath_sdk.store.mooncake import INSTALL_HINT, MooncakeStore, master_binary
from tests.conftest import mounted_tmpfs

# 15360 bytes: not a whole number of pages, so the direct-I/O tail path runs too.
LAYOUT = KVLayout(num_layers=3, block_size=16, num_kv_heads=2, head_dim=40, dtype=torch.float16)
ROOT = namespace_key("test-model", "float16", 16)


class FakeClock:
    """An injectable wall clock: TTL and LRU tests advance it instead of sleeping."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def keys_for(n: int, salt: int = 0) -> list[BlockKey]:
    return block_keys(ROOT, [salt * 1_000_003 + i for i in range(n * LAYOUT.block_size)], LAYOUT.block_size)


def content(key: BlockKey, nbytes: int = LAYOUT.full_block_nbytes) -> np.ndarray:
    """Each key's bytes are a function of the key, so any reader can tell a wrong block from a right one."""
    return np.random.default_rng(int.from_bytes(key[:8], "little")).integers(0, 256, nbytes, dtype=np.uint8)


def block_of(key: BlockKey, layout: KVLayout = LAYOUT) -> FullBlock:
    return FullBlock(layout, bytearray(content(key, layout.full_block_nbytes).tobytes()))


def empty_block(aligned: bool = True) -> FullBlock:
    if aligned:
        return FullBlock(LAYOUT, aligned_empty(LAYOUT.full_block_nbytes))
    return FullBlock(LAYOUT, torch.empty(LAYOUT.full_block_nbytes + 64, dtype=torch.uint8)[64:])


def holds(block: FullBlock, key: BlockKey) -> bool:
    return bool(np.array_equal(block.raw.numpy(), content(key)))


StoreFactory = Callable[..., BlockStore]


def _make_fs(tmp_path: Path, index: Literal["sqlite", "shared"] = "sqlite") -> Iterator[StoreFactory]:
    opened: list[BlockStore] = []

    def make(capacity_bytes: int | None = None, clock: Callable[[], float] = time.time) -> BlockStore:
        store = FsStore(
            tmp_path / "store", capacity_bytes=capacity_bytes, read_threads=4, clock=clock, index=index
        )
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(pid: int) -> list[str]:
    """Local addresses `pid` listens on (TCP), from ss(8)."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    return [line.split()[3] for line in out.splitlines() if f"pid={pid}," in line]


def _make_mooncake(tmp_path: Path) -> Iterator[StoreFactory]:
    """A real mooncake_master on 127.0.0.1 (free ports), checked to listen there only."""
    try:
        binary = master_binary()
        import mooncake.store  # noqa: F401  (fails without libibverbs1)
    except (StorageError, ImportError) as exc:
        pytest.skip(f"mooncake unavailable: {exc}; {INSTALL_HINT}")
    if shutil.which("ss") is None:
        pytest.skip("ss(8) (iproute2) is needed to check what mooncake_master binds")
    rpc, metrics = _free_port(), _free_port()
    log = open(tmp_path / "master.log", "wb")  # noqa: SIM115  (closed below)
    master = subprocess.Popen(
        [str(binary), "-rpc_address=127.0.0.1", f"-rpc_port={rpc}", "-metrics_host=127.0.0.1",
         f"-metrics_port={metrics}", "-enable_metric_reporting=false", "-default_kv_lease_ttl=100"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    opened: list[BlockStore] = []
    try:
        deadline = time.monotonic() + 15
        while f"127.0.0.1:{rpc}" not in _listening(master.pid):
            assert master.poll() is None, (tmp_path / "master.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "mooncake_master did not start listening"
            time.sleep(0.05)
        time.sleep(0.2)  # the admin (metrics) listener comes up just after the RPC one
        exposed = [a for a in _listening(master.pid) if not a.startswith("127.0.0.1:")]
        assert not exposed, f"mooncake_master ignored -rpc_address/-metrics_host and listens on {exposed}"
        config = MooncakeConfig(
            master_address=f"127.0.0.1:{rpc}", global_segment_bytes=64 << 20, local_buffer_bytes=16 << 20
        )

        def make(capacity_bytes: int | None = None, clock: Callable[[], float] = time.time) -> BlockStore:
            store = MooncakeStore(config, tmp_path / "mc-index", capacity_bytes=capacity_bytes, clock=clock)
            opened.append(store)
            return store

        yield make
    finally:
        for store in opened:
            store.close()
        master.kill()  # its state is the test's only; a clean shutdown costs a second
        master.wait(10)
        log.close()


@pytest.fixture(params=["fs", "fs-shared", "mooncake"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Yields a factory of stores of one backend (fs-shared: the fs backend with the index hosts can
    share); each runs the same suite."""
    if request.param == "fs-shared":
        yield from _make_fs(tmp_path, "shared")
    else:
        yield from {"fs": _make_fs, "mooncake": _make_mooncake}[request.param](tmp_path)


# -- every backend ------------------------------------------------------------------------------------
def test_round_trip_parallel_reads_and_misses(make_store: StoreFactory) -> None:
    store = make_store()
    keys = keys_for(12)
    for parent, key in zip([None, *keys], keys, strict=False):
        store.put(key, parent, LAYOUT.block_size, block_of(key))
    outs = [empty_block(aligned=i % 2 == 0) for i in range(len(keys))]
    assert store.read_many(list(zip(keys, outs, strict=True))) == [True] * len(keys)
    assert all(holds(out, key) for out, key in zip(outs, keys, strict=True))
    missing = keys_for(1, salt=99)[0]
    assert store.get_into(missing, empty_block()) is False
    stats = store.stats()
    assert (stats.hits, stats.misses, stats.blocks) == (12, 1, 12)
    assert stats.bytes_read == stats.bytes_written == 12 * LAYOUT.full_block_nbytes


@pytest.mark.parametrize("aligned", [True, False])
def test_a_partial_block_is_stored_packed_and_read_back_unpacked(
    make_store: StoreFactory, aligned: bool
) -> None:
    """Only a partial block's used rows are stored and read (its tokens' bytes); the read spreads them
    back into the Full Block layout with the rows past them zeroed."""
    store = make_store()
    parent = keys_for(1)[0]
    for tokens in (1, 5, LAYOUT.block_size - 1):
        key = partial_key(parent, list(range(tokens)))
        src = block_of(key)
        store.put(key, parent, tokens, src)
        out = empty_block(aligned)
        out.raw.fill_(0xFF)  # whatever the buffer held before
        before = store.stats()
        assert store.get_into(key, out, tokens)
        rows = [b.tensor[:, :tokens].contiguous().view(torch.uint8) for b in (out, src)]
        assert torch.equal(*rows)  # bytes: random payloads hold NaNs
        assert not out.tensor[:, tokens:].any()
        assert store.stats().bytes_read - before.bytes_read == tokens * LAYOUT.bytes_per_token
    assert store.stats().bytes_written == (1 + 5 + LAYOUT.block_size - 1) * LAYOUT.bytes_per_token


def test_read_many_takes_full_and_partial_blocks_together(make_store: StoreFactory) -> None:
    """A cached prefix in one call: its Full Blocks, then its partial block."""
    store = make_store()
    full = keys_for(3)
    for parent, key in zip([None, *full], full, strict=False):
        store.put(key, parent, LAYOUT.block_size, block_of(key))
    tail = partial_key(full[-1], [7] * 9)
    store.put(tail, full[-1], 9, block_of(tail))
    outs = [empty_block() for _ in range(4)]
    tokens = [LAYOUT.block_size] * 3 + [9]
    assert store.read_many(list(zip([*full, tail], outs, strict=True)), tokens) == [True] * 4
    assert all(holds(out, key) for out, key in zip(outs, full, strict=False))
    rows = [b.tensor[:, :9].contiguous().view(torch.uint8) for b in (outs[3], block_of(tail))]
    assert torch.equal(*rows)
    with pytest.raises(InvalidInput):
        store.read_many(list(zip(full, outs, strict=False)), [16, 16])  # a count per block


def test_a_corrupt_partial_block_is_a_miss(tmp_path: Path) -> None:
    store = FsStore(tmp_path / "s")
    key = partial_key(keys_for(1)[0], [1, 2, 3])
    store.put(key, None, 3, block_of(key))
    assert store.path_of(key).stat().st_size == 2 * 4096  # header + one page of packed rows
    _flip(store.path_of(key), 4096 + 3 * LAYOUT.bytes_per_token - 1)
    assert store.get_into(key, empty_block(), 3) is False
    assert store.stats().corrupt == 1
    store.close()


def test_longest_prefix_walks_keys(make_store: StoreFactory) -> None:
    store = make_store()
    keys = keys_for(6)
    for key in keys[:4]:
        store.put(key, None, LAYOUT.block_size, block_of(key))
    store.put(keys[5], None, LAYOUT.block_size, block_of(keys[5]))
    assert store.longest_prefix(keys) == 4
    assert store.longest_prefix(keys[:3]) == 3
    assert store.longest_prefix(keys_for(3, salt=7)) == 0


def test_put_is_idempotent(make_store: StoreFactory) -> None:
    store = make_store()
    key = keys_for(1)[0]
    store.put(key, None, LAYOUT.block_size, block_of(key))
    store.put(key, None, LAYOUT.block_size, block_of(key))
    assert store.stats().blocks == 1
    assert store.stats().bytes_written == LAYOUT.full_block_nbytes


def _filled(make_store: StoreFactory, clock: FakeClock, n: int) -> tuple[BlockStore, list[BlockKey]]:
    """A store with capacity for exactly `n` blocks, holding n blocks written one clock tick apart."""
    probe = make_store(clock=clock)
    one = keys_for(1, salt=500)[0]
    probe.put(one, None, LAYOUT.block_size, block_of(one))  # the oldest block: evicted first
    per_block = probe.stats().stored_bytes
    store = make_store(capacity_bytes=n * per_block + per_block // 2, clock=clock)
    keys = keys_for(n)
    for key in keys:
        clock.now += 1
        store.put(key, None, LAYOUT.block_size, block_of(key))
    assert [store.contains(k) for k in keys] == [True] * n
    return store, keys


def test_eviction_is_lru_and_never_takes_a_pinned_block(make_store: StoreFactory) -> None:
    clock = FakeClock()
    store, keys = _filled(make_store, clock, 4)
    assert store.pin("session-a", [keys[0]], ttl_s=100) == 1
    clock.now += 1
    assert store.get_into(keys[1], empty_block())  # keys[1] becomes the most recently used
    new = keys_for(3, salt=1)
    for key in new:
        clock.now += 1
        store.put(key, None, LAYOUT.block_size, block_of(key))
    # Oldest unpinned first: keys[2], keys[3], then keys[1] (read later), never keys[0] (pinned).
    assert [store.contains(k) for k in keys] == [True, False, False, False]
    assert all(store.contains(k) for k in new)
    assert store.stats().evicted == 4  # the probe block, then three of ours
    out = empty_block()
    assert store.get_into(keys[0], out) and holds(out, keys[0])


def test_pin_ttl_expires_and_refresh_extends(make_store: StoreFactory) -> None:
    clock = FakeClock()
    store, keys = _filled(make_store, clock, 2)
    store.pin("s1", [keys[0]], ttl_s=10)
    store.pin("s2", [keys[1]], ttl_s=10)
    clock.now += 8
    store.pin("s1", [keys[0]], ttl_s=10)  # a step refreshes s1's pin; s2's lapses at +10
    clock.now += 4
    extra = keys_for(1, salt=2)[0]
    store.put(extra, None, LAYOUT.block_size, block_of(extra))
    assert store.contains(keys[0]) and not store.contains(keys[1])
    assert store.stats().pinned_blocks == 1


def test_full_of_pinned_blocks_refuses_the_write(make_store: StoreFactory) -> None:
    clock = FakeClock()
    store, keys = _filled(make_store, clock, 3)
    store.pin("s", keys, ttl_s=100)
    extra = keys_for(1, salt=3)[0]
    with pytest.raises(StorageError):
        store.put(extra, None, LAYOUT.block_size, block_of(extra))
    assert not store.contains(extra)
    assert all(store.contains(k) for k in keys)
    store.unpin("s")
    store.put(extra, None, LAYOUT.block_size, block_of(extra))
    assert store.contains(extra) and not store.contains(keys[0])


def test_evict_to_capacity_after_unpin(make_store: StoreFactory) -> None:
    clock = FakeClock()
    store, keys = _filled(make_store, clock, 3)
    assert store.pin("s", keys, ttl_s=50) == 3
    store.unpin("s", keys[:1])
    assert store.evict_to_capacity() == 0  # under capacity: nothing to do
    assert store.stats().pinned_blocks == 2


# -- the fs backend ---------------------------------------------------------------------------------------
def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


@pytest.mark.parametrize("where", ["payload", "payload-tail", "header"])
def test_corruption_is_a_quarantined_miss(tmp_path: Path, where: str) -> None:
    store = FsStore(tmp_path / "s")
    key = keys_for(1)[0]
    store.put(key, None, LAYOUT.block_size, block_of(key))
    path = store.path_of(key)
    _flip(
        path,
        {"payload": 4096 + 100, "payload-tail": 4096 + LAYOUT.full_block_nbytes - 1, "header": 40}[where],
    )
    assert store.get_into(key, empty_block()) is False
    assert not store.contains(key)
    assert len(list((tmp_path / "s" / "quarantine").iterdir())) == 1
    stats = store.stats()
    assert (stats.corrupt, stats.misses, stats.hits, stats.blocks) == (1, 1, 0, 0)
    # Recomputed and written again, it reads back fine.
    store.put(key, None, LAYOUT.block_size, block_of(key))
    out = empty_block(aligned=False)
    assert store.get_into(key, out) and holds(out, key)
    store.close()


def test_truncated_block_is_a_miss(tmp_path: Path) -> None:
    store = FsStore(tmp_path / "s")
    key = keys_for(1)[0]
    store.put(key, None, LAYOUT.block_size, block_of(key))
    os.truncate(store.path_of(key), 4096 + 1000)
    assert store.get_into(key, empty_block()) is False
    assert store.stats().corrupt == 1
    store.close()


def test_wrong_layout_is_an_error_not_a_miss(tmp_path: Path) -> None:
    store = FsStore(tmp_path / "s")
    key = keys_for(1)[0]
    store.put(key, None, LAYOUT.block_size, block_of(key))
    other = KVLayout(num_layers=2, block_size=16, num_kv_heads=2, head_dim=40, dtype=torch.float16)
    with pytest.raises(InvalidInput):
        store.get_into(key, FullBlock.empty(other))
    store.close()


def test_file_system_without_direct_io_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Some file systems (older tmpfs, some FUSE mounts) refuse O_DIRECT with EINVAL at open."""
    real_open = os.open

    def no_direct(path: object, flags: int, *args: object) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "O_DIRECT not supported")
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    store = FsStore(tmp_path / "s")
    monkeypatch.setattr(os, "open", no_direct)
    keys = keys_for(3)
    src = empty_block()
    for key in keys:
        src.raw.numpy()[:] = content(key)
        store.put(key, None, LAYOUT.block_size, src)
    outs = [empty_block() for _ in keys]
    assert all(store.read_many(list(zip(keys, outs, strict=True))))
    assert all(holds(o, k) for o, k in zip(outs, keys, strict=True))
    assert store._direct is False
    store.close()


def test_header_records_parent_and_token_count(tmp_path: Path) -> None:
    from dualpath_sdk.store.header import decode_header

    store = FsStore(tmp_path / "s")
    parent, key = keys_for(2)
    store.put(key, parent, 16, block_of(key))
    header = decode_header(store.path_of(key).read_bytes()[:4096])
    assert header is not None
    assert header[:5] == (key, parent, 16, "float16", LAYOUT.full_block_nbytes)
    store.close()


def test_lost_index_is_rebuilt_from_the_files(tmp_path: Path) -> None:
    store = FsStore(tmp_path / "s")
    keys = keys_for(3)
    for key in keys:
        store.put(key, None, LAYOUT.block_size, block_of(key))
    store.close()
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / "s" / f"index.sqlite{suffix}").unlink(missing_ok=True)
    again = FsStore(tmp_path / "s")
    assert again.stats().blocks == 3
    again.close()


# A Full Block of 4 MiB: big enough that a kill often lands inside a write.
BIG = KVLayout(num_layers=16, block_size=64, num_kv_heads=8, head_dim=64, dtype=torch.float16)


def big_content(key: BlockKey) -> np.ndarray:
    """The key repeated: cheap to make (so the writer spends its time writing) and unique per key."""
    return np.tile(np.frombuffer(key, dtype=np.uint8), BIG.full_block_nbytes // len(key))


def _writer(root: str, salt: int, started: EventType) -> None:
    """Child process: write BIG blocks, from a page-aligned buffer (direct I/O), until killed."""
    store = FsStore(Path(root), read_threads=1)
    block = FullBlock(BIG, aligned_empty(BIG.full_block_nbytes))
    i = 0
    while True:
        key = block_keys(ROOT, [salt, i], 2)[0]
        block.raw.numpy()[:] = big_content(key)
        started.set()
        store.put(key, None, BIG.block_size, block)
        i += 1


def _verify_all(root: Path) -> tuple[int, int]:
    """Read every visible block of `root`; returns (blocks, bad)."""
    store = FsStore(root, read_threads=2)
    paths = list((root / "blocks").glob("*/*.kv"))
    bad = 0
    for path in paths:
        key = bytes.fromhex(path.stem)
        out = FullBlock(BIG, aligned_empty(BIG.full_block_nbytes))
        if not store.get_into(key, out) or not np.array_equal(out.raw.numpy(), big_content(key)):
            bad += 1
    leftover = list((root / "tmp").iterdir())
    store.close()
    assert leftover == [] or all(not p.exists() for p in leftover)
    return len(paths), bad


def test_sigkill_mid_write_never_leaves_a_visible_partial_block(tmp_path: Path) -> None:
    root = tmp_path / "s"
    FsStore(root).close()
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(7)
    kills_mid_write = 0
    for attempt in range(25):
        started = ctx.Event()
        proc = ctx.Process(target=_writer, args=(str(root), attempt, started))
        proc.start()
        assert started.wait(30) and proc.pid is not None
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        kills_mid_write += any((root / "tmp").iterdir())
        blocks, bad = _verify_all(root)  # also removes the dead writer's temp file
        assert bad == 0, f"attempt {attempt}: {bad} of {blocks} visible blocks did not read back exactly"
        assert not any((root / "tmp").iterdir())
    assert blocks > 0
    assert kills_mid_write >= 5, "the kills never landed inside a write; the test proved nothing"
    assert FsStore(root).stats().corrupt == 0


def _mixed_worker(root: str, me: int, rounds: int) -> None:
    """Child: write own and shared blocks, read everyone's; exit 1 on a wrong byte."""
    store = FsStore(Path(root), read_threads=2)
    mine, shared = keys_for(rounds, salt=100 + me), keys_for(rounds, salt=1)
    for i in range(rounds):
        for key in (mine[i], shared[i]):
            store.put(key, None, LAYOUT.block_size, block_of(key))
        store.pin(f"w{me}", [mine[i]], ttl_s=60)
        others = [k for w in range(3) for k in keys_for(i + 1, salt=100 + w)] + shared[: i + 1]
        outs = [empty_block() for _ in others]
        for key, out, hit in zip(
            others, outs, store.read_many(list(zip(others, outs, strict=True))), strict=True
        ):
            if hit and not holds(out, key):
                os._exit(1)
    os._exit(0)


def test_several_processes_read_and_write_one_store(tmp_path: Path) -> None:
    root = tmp_path / "s"
    FsStore(root).close()
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_mixed_worker, args=(str(root), me, 15)) for me in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    store = FsStore(root)
    stats = store.stats()
    assert stats.blocks == 3 * 15 + 15 and stats.pinned_blocks == 45
    everything = [k for w in range(3) for k in keys_for(15, salt=100 + w)] + keys_for(15, salt=1)
    outs = [empty_block() for _ in everything]
    assert all(store.read_many(list(zip(everything, outs, strict=True))))
    assert all(holds(o, k) for o, k in zip(outs, everything, strict=True))
    store.close()


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a real ENOSPC."""
    with mounted_tmpfs(tmp_path / "small", "1m") as mount:
        yield mount


def test_disk_full_is_a_storage_error_with_nothing_partial(small_tmpfs: Path) -> None:
    store = FsStore(small_tmpfs / "s")
    keys = keys_for(200)
    written = []
    with pytest.raises(StorageError):
        for key in keys:
            store.put(key, None, LAYOUT.block_size, block_of(key))
            written.append(key)
    assert 0 < len(written) < len(keys)
    assert not any((small_tmpfs / "s" / "tmp").iterdir())
    visible = [bytes.fromhex(p.stem) for p in (small_tmpfs / "s" / "blocks").glob("*/*.kv")]
    assert set(written) <= set(visible)
    for key in visible:
        out = empty_block()
        assert store.get_into(key, out) and holds(out, key)
    assert store.stats().corrupt == 0
    store.close()


def test_open_store_from_config_with_a_capped_storage_nic(tmp_path: Path) -> None:
    from dualpath_sdk.store import StoreConfig, open_store

    node = f"test-{os.getpid()}"
    config = StoreConfig(root=tmp_path / "s", snic_read_bps=2e6, capacity_bytes=1 << 30)
    store = open_store(config, node=node)
    try:
        assert isinstance(store, FsStore) and store.limiter is not None
        keys = keys_for(8)
        for key in keys:
            store.put(key, None, LAYOUT.block_size, block_of(key))
        outs = [empty_block() for _ in keys]
        start = time.monotonic()
        assert all(store.read_many(list(zip(keys, outs, strict=True))))
        # 8 x 20 KiB through a 2 MB/s NIC (less one 10 ms burst): at least ~70 ms.
        assert time.monotonic() - start >= (8 * 20480 - 20000) / 2e6 * 0.95
    finally:
        store.close()
        Path(f"/dev/shm/dualpath-snic-{node}").unlink(missing_ok=True)
