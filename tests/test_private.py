"""Private by default: every directory and file the store and the transports create is owner-only
(directories 0o700, files 0o600), whatever the umask; what already existed keeps its mode."""

from __future__ import annotations

import os
import sqlite3
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from dualpath_sdk.config import TransferConfig
from dualpath_sdk.fsutil import make_private_dirs
from dualpath_sdk.kv.block import FullBlock, KVLayout
from dualpath_sdk.kv.keys import block_keys, namespace_key
from dualpath_sdk.store.fs import FsStore
from dualpath_sdk.store.limiter import StorageNicLimiter
from dualpath_sdk.store.manifest import ManifestStore
from dualpath_sdk.transfer import open_transport

LAYOUT = KVLayout(num_layers=2, block_size=4, num_kv_heads=1, head_dim=8)
ROOT = namespace_key("m", "float32", 4)
SHM = Path("/dev/shm")


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def shared(paths: list[Path]) -> dict[str, str]:
    """The paths that group or others may access, with their modes."""
    return {str(p): oct(mode(p)) for p in paths if mode(p) & 0o077}


def test_store_manifests_leases_regions_and_nic_state_are_owner_only(tmp_path: Path, umask_022: None) -> None:
    base = tmp_path / "fresh"  # nothing of it exists yet: the store makes it, parents included
    node = f"priv-{uuid.uuid4().hex[:8]}"
    shm_before = set(SHM.iterdir())
    limiter = StorageNicLimiter(node, 1e12, 1e12)
    store = FsStore(base / "deep" / "store", limiter=limiter)
    transport = open_transport(TransferConfig(link_bps=1e12), node)
    try:
        keys = block_keys(ROOT, list(range(8)), LAYOUT.block_size)
        for key in keys:
            raw = bytearray(np.full(LAYOUT.full_block_nbytes, 7, np.uint8).tobytes())
            store.put(key, None, LAYOUT.block_size, FullBlock(LAYOUT, raw))
        out = FullBlock(LAYOUT, bytearray(LAYOUT.full_block_nbytes))
        assert store.get_into(keys[0], out)
        store.pin("s", keys, 60)
        ms = ManifestStore(base / "deep" / "store" / "sessions")
        m = ms.save(ms.new(session_id="s").model_copy(update={"token_ids": list(range(8))}))
        with ms.lease("s") as lease:
            lease.save(m)
        ms.fork("s", "c")
        region = transport.allocate("private", 1 << 16)

        created = [base, *base.rglob("*")]
        names = {p.name for p in created}
        assert {"deep", "store", "tmp", "quarantine", "blocks", "00", "ff", "sessions"} <= names
        assert {"index.sqlite", "s.manifest", "s.lock", "c.manifest"} <= names
        assert sum(p.suffix == ".kv" for p in created) == 2
        # SQLite makes its WAL files with the database's mode: they exist now (a connection is open).
        assert {"index.sqlite-wal", "index.sqlite-shm"} <= names
        assert shared(created) == {}
        assert all(mode(p) == 0o700 for p in created if p.is_dir())

        ours = [
            p
            for p in set(SHM.iterdir()) - shm_before
            if p.name.startswith("dualpath-") and (node in p.name or f"-{os.getpid()}-" in p.name)
        ]
        assert {SHM / f"dualpath-snic-{node}", SHM / f"dualpath-link-{node}"} <= set(ours)
        assert Path(region.descriptor.endpoint) in ours
        assert shared(ours) == {}
        region.close()
    finally:
        transport.close()
        store.close()
        limiter.close()
        for path in SHM.glob(f"dualpath-*-{node}"):
            path.unlink(missing_ok=True)


def test_sqlite_journal_files_take_the_databases_mode(tmp_path: Path, umask_022: None) -> None:
    """With a DELETE journal the -journal file exists only inside a write: catch it there."""
    store = FsStore(tmp_path / "s", index_journal="DELETE")
    try:
        store.index._write(lambda db: db.execute("INSERT INTO blocks VALUES (x'00', 1, 0)"))
        seen: list[int] = []

        def look(db: sqlite3.Connection) -> None:
            journal = tmp_path / "s" / "index.sqlite-journal"
            db.execute("INSERT INTO blocks VALUES (x'01', 1, 0)")
            seen.append(mode(journal))

        store.index._write(look)
        assert seen == [0o600]
        assert mode(tmp_path / "s" / "index.sqlite") == 0o600
    finally:
        store.close()


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077, 0o277])
def test_private_dirs_are_exactly_0700_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        created = make_private_dirs(tmp_path / "a" / "b" / "c")
    finally:
        os.umask(old)
    assert created == [tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "c"]
    assert [mode(p) for p in created] == [0o700] * 3
    assert make_private_dirs(tmp_path / "a" / "b" / "c") == []


def test_what_already_exists_keeps_its_mode(tmp_path: Path, umask_022: None) -> None:
    """An older version's (or the operator's) directory is not tightened behind their back."""
    root = tmp_path / "old"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    store = FsStore(root)
    store.close()
    ms = ManifestStore(root / "sessions")
    ms.new(session_id="s")
    assert mode(root) == 0o755
    assert mode(root / "tmp") == 0o700 and mode(root / "sessions") == 0o700
    assert mode(root / "sessions" / "s.manifest") == 0o600
