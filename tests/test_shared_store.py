"""The fs store with the index hosts can share (store/shared_index.py): files only, no shared memory.

Two processes stand in for two hosts: each opens its own store after the fork, no memory is shared
between them (nothing mapped shared, no lock but in files), and they meet only in the directory, as
two hosts on one network file system would."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from dualpath_sdk.errors import StorageError
from dualpath_sdk.store.fs import FsStore
from dualpath_sdk.store.shared_index import LEASE_FILE, SharedIndex
from tests.test_store import LAYOUT, FakeClock, block_of, empty_block, holds, keys_for

FILE_BYTES = 20480  # a LAYOUT block on disk: the 4 KiB header and its 15360 bytes padded to pages
CAPACITY = 16 * FILE_BYTES


def _host(root: str, me: int, seconds: float, out: str) -> None:
    """One host: pins a few blocks, then writes new ones past capacity (so it evicts), pins and unpins
    a rotating one, and reads its pinned blocks and the other host's recent ones, checking bytes."""
    store = FsStore(Path(root), capacity_bytes=CAPACITY, read_threads=2, index="shared")
    kept = [keys_for(1, salt=900 + 10 * me + j)[0] for j in range(4)]
    for key in kept:
        store.put(key, None, LAYOUT.block_size, block_of(key))
    assert store.pin(f"host{me}", kept, ttl_s=3600) == 4
    report = {"puts": 0, "lost": 0, "bad": 0, "other_hits": 0, "other_misses": 0, "churn_pins": 0}
    churn: bytes | None = None
    mine_all = set(kept)
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        key = keys_for(1, salt=1000 * me + i)[0]
        store.put(key, None, LAYOUT.block_size, block_of(key))
        mine_all.add(key)
        report["puts"] += 1
        if i % 3 == 0 and store.pin(f"host{me}-churn", [key], ttl_s=3600) == 1:
            if churn is not None:
                store.unpin(f"host{me}-churn", [churn])
            churn = key
            report["churn_pins"] += 1
        mine = kept + ([churn] if churn is not None else [])
        outs = [empty_block() for _ in mine]
        for k, o, hit in zip(mine, outs, store.read_many(list(zip(mine, outs, strict=True))), strict=True):
            report["lost"] += not hit
            report["bad"] += hit and not holds(o, k)
        theirs = [k for k, _, _ in store.index.entries() if k not in mine_all]
        outs = [empty_block() for _ in theirs]
        for k, o, hit in zip(
            theirs, outs, store.read_many(list(zip(theirs, outs, strict=True))), strict=True
        ):
            report["other_hits" if hit else "other_misses"] += 1
            report["bad"] += hit and not holds(o, k)
        i += 1
    stats = store.stats()
    report.update(evicted=stats.evicted, corrupt=stats.corrupt)
    store.close()
    Path(out).write_text(json.dumps(report))


def test_two_hosts_pin_evict_and_read_one_directory(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    FsStore(root, index="shared").close()
    ctx = multiprocessing.get_context("fork")
    outs = [tmp_path / f"host{me}.json" for me in range(2)]
    procs = [ctx.Process(target=_host, args=(str(root), me, 3.0, str(outs[me]))) for me in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    reports = [json.loads(o.read_text()) for o in outs]
    for r in reports:
        assert r["lost"] == 0 and r["bad"] == 0 and r["corrupt"] == 0, r
        assert r["evicted"] > 0 and r["churn_pins"] > 1, r  # it swept, and pinned while the other swept
        assert r["other_hits"] > 0, r  # read the other's blocks (some evicted under the reader, misses)
    store = FsStore(root, index="shared")
    kept = [keys_for(1, salt=900 + 10 * me + j)[0] for me in range(2) for j in range(4)]
    outs_ = [empty_block() for _ in kept]
    assert all(store.read_many(list(zip(kept, outs_, strict=True))))
    assert all(holds(o, k) for o, k in zip(outs_, kept, strict=True))
    assert store.stats().pinned_blocks == 8 + 2  # each host's four, and its last rotating pin
    assert not list((root / "trash").iterdir()) and not (root / LEASE_FILE).exists()
    store.close()


def test_a_block_pinned_while_its_sweep_runs_is_put_back(tmp_path: Path) -> None:
    """The sweeper renames a victim aside, then reads the pins again: a pin that landed in between
    (another host's session) brings the block back whole."""
    clock = FakeClock()
    store = FsStore(tmp_path / "s", capacity_bytes=2 * FILE_BYTES + 100, index="shared", clock=clock)
    other = FsStore(tmp_path / "s", index="shared", clock=clock)
    keys = keys_for(3)
    for key in keys[:2]:
        clock.now += 1
        store.put(key, None, LAYOUT.block_size, block_of(key))
    assert isinstance(store.index, SharedIndex)
    store.index.headroom = 0.0  # the sweep frees exactly the room the write needs: one block
    sweep_protected = store.index._protected

    calls = []

    def pinned_meanwhile() -> set[bytes]:
        calls.append(1)
        if len(calls) == 2:  # the re-check, after the rename
            assert not store.contains(keys[0])  # renamed aside: the oldest, unpinned when chosen
            other.index._save("elsewhere", {keys[0]: clock.now + 60})  # type: ignore[union-attr]
        return sweep_protected()

    store.index._protected = pinned_meanwhile  # type: ignore[method-assign]
    clock.now += 1
    store.put(keys[2], None, LAYOUT.block_size, block_of(keys[2]))
    out = empty_block()
    assert store.get_into(keys[0], out) and holds(out, keys[0])
    assert len(calls) == 2 and store.stats().evicted == 0 and store.index.is_pinned(keys[0])
    store.close()
    other.close()


def test_a_dead_sweepers_lease_expires_and_a_live_one_is_waited_for(tmp_path: Path) -> None:
    clock = FakeClock()
    store = FsStore(tmp_path / "s", capacity_bytes=FILE_BYTES + 100, index="shared", clock=clock)
    index = store.index
    assert isinstance(index, SharedIndex)
    lease = tmp_path / "s" / LEASE_FILE
    lease.write_text(json.dumps({"token": "other-host-1-x", "expires": clock.now + 5}))
    with pytest.raises(StorageError, match="held"), index._sweeping(wait_s=0.1):
        pass
    assert lease.exists()  # not ours: left alone
    clock.now += 10  # past its expiry and the skew margin: its holder is gone
    keys = keys_for(2)
    for key in keys:
        store.put(key, None, LAYOUT.block_size, block_of(key))
    assert not store.contains(keys[0]) and store.contains(keys[1]) and not lease.exists()
    lease.write_text("")  # created, never written (its holder died at once): expires by its mtime
    os.utime(lease, (time.time() - 60, time.time() - 60))
    with index._sweeping(wait_s=0.1):
        assert json.loads(lease.read_text())["token"].startswith(index._prefix)
    store.close()


def test_pins_are_one_file_per_owner_and_expired_files_are_dropped(tmp_path: Path) -> None:
    clock = FakeClock()
    store = FsStore(tmp_path / "s", index="shared", clock=clock)
    keys = keys_for(3)
    for key in keys:
        store.put(key, None, LAYOUT.block_size, block_of(key))
    assert store.pin("a", keys[:2], ttl_s=10) == 2 and store.pin("b", keys[2:], ttl_s=100) == 1
    assert store.pin("a", [keys_for(1, salt=7)[0]], ttl_s=10) == 0  # not stored: nothing pinned
    pin_files = list((tmp_path / "s" / "pins").glob("*.pin"))
    assert len(pin_files) == 2 and all(p.stat().st_mode & 0o777 == 0o600 for p in pin_files)  # owner-only
    store.unpin("a", keys[:1])
    assert {(o, k) for o, k, _ in store.index.pins()} == {("a", keys[1]), ("b", keys[2])}
    clock.now += 20
    assert store.stats().pinned_blocks == 1
    assert [(o, k) for o, k, _ in store.index.drop_expired_pins()] == [("a", keys[1])]
    assert [o for o, _, _ in store.index.pins()] == ["b"]
    store.unpin("b")
    assert not list((tmp_path / "s" / "pins").iterdir()) and not (tmp_path / "s" / "index.sqlite").exists()
    store.close()


def test_the_store_commands_read_and_collect_a_shared_store(tmp_path: Path) -> None:
    """`dualpath store usage/gc` on a store with the shared index: the same answers from the files."""
    from dualpath_sdk.config import StoreConfig
    from dualpath_sdk.store.admin import StoreAdmin

    clock = FakeClock()
    store = FsStore(tmp_path / "s", index="shared", clock=clock)
    keys = keys_for(3)
    for key in keys:
        store.put(key, None, LAYOUT.block_size, block_of(key))
    store.pin("a", keys[:1], ttl_s=10)
    store.pin("b", keys[1:2], ttl_s=1000)
    store.close()
    clock.now += 100  # a's pin has expired; nothing has been used since
    with StoreAdmin(StoreConfig(root=tmp_path / "s", index="shared"), clock=clock) as admin:
        usage = admin.usage()
        assert (usage.blocks, usage.pinned_blocks, usage.expired_pins) == (3, 1, 1)
        report = admin.gc(unreferenced=True, min_age_s=50)
        assert [p.owner for p in report.expired_pins] == ["a"]
        assert {bytes.fromhex(r.key) for r in report.unreferenced} == {keys[0], keys[2]}
        assert not report.orphan_files and not report.stale_rows  # the files are the index
        assert [admin.store.contains(k) for k in keys] == [False, True, False]
