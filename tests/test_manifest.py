"""Session manifests: atomic saves, typed errors for missing and damaged files, forks that pin."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from dualpath_sdk.errors import InvalidInput, ManifestCorrupt, SessionNotFound, StorageError
from dualpath_sdk.kv.block import FullBlock, KVLayout
from dualpath_sdk.kv.keys import block_keys, namespace_key
from dualpath_sdk.store.fs import FsStore
from dualpath_sdk.store.manifest import ManifestStore, SessionManifest

LAYOUT = KVLayout(num_layers=2, block_size=4, num_kv_heads=1, head_dim=8)
ROOT = namespace_key("m", "float32", 4)


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def stepped(m: SessionManifest, tokens: list[int]) -> SessionManifest:
    """What a step does to a manifest: append tokens and messages, rederive the block keys."""
    token_ids = m.token_ids + tokens
    messages = [*m.messages, {"role": "user", "content": f"turn {len(m.messages)}"}]
    return m.model_copy(update={"token_ids": token_ids, "messages": messages}).with_keys(
        block_keys(ROOT, token_ids, LAYOUT.block_size)
    )


def test_save_load_round_trip_and_timestamps(tmp_path: Path) -> None:
    clock = Clock()
    ms = ManifestStore(tmp_path, clock=clock)
    m = ms.new(tenant="acme", ttl_s=60, session_id="s1")
    assert (m.created_at, m.updated_at) == (500.0, 500.0)
    clock.now = 510.0
    saved = ms.save(stepped(m, list(range(10))))
    loaded = ms.load("s1")
    assert loaded == saved
    assert loaded.updated_at == 510.0 and loaded.created_at == 500.0
    assert loaded.keys == block_keys(ROOT, list(range(10)), 4) and len(loaded.keys) == 2
    assert loaded.tenant == "acme" and loaded.messages[0]["content"] == "turn 0"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_missing_session_is_session_not_found(tmp_path: Path) -> None:
    with pytest.raises(SessionNotFound):
        ManifestStore(tmp_path).load("nope")


def test_ids_that_are_not_plain_names_are_rejected(tmp_path: Path) -> None:
    ms = ManifestStore(tmp_path)
    for bad in ("../evil", "a/b", ""):
        with pytest.raises(InvalidInput):
            ms.load(bad)
    ms.new(session_id="taken")
    with pytest.raises(InvalidInput):
        ms.new(session_id="taken")


@pytest.mark.parametrize("damage", ["flip", "truncate", "header", "empty"])
def test_damaged_manifest_is_a_typed_error(tmp_path: Path, damage: str) -> None:
    ms = ManifestStore(tmp_path)
    ms.save(stepped(ms.new(session_id="s1"), [1, 2, 3, 4, 5]))
    path = ms.path_of("s1")
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-10] ^= 0x01
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "header":
        data[:9] = b"NOTAMANIF"
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestCorrupt):
        ms.load("s1")


def test_fork_shares_and_pins_the_parents_blocks(tmp_path: Path) -> None:
    ms = ManifestStore(tmp_path / "sessions")
    store = FsStore(tmp_path / "blocks")
    parent = ms.save(stepped(ms.new(session_id="p"), list(range(12))))
    for key in parent.keys:
        store.put(key, None, 4, FullBlock(LAYOUT, bytearray(np.zeros(LAYOUT.full_block_nbytes, np.uint8))))
    child = ms.fork("p", "c", blocks=store)
    assert child.parent_id == "p" and child.session_id == "c"
    assert (child.token_ids, child.block_keys, child.messages) == (
        parent.token_ids,
        parent.block_keys,
        parent.messages,
    )
    assert ms.load("c") == child and ms.load("p") == parent
    assert store.stats().pinned_blocks == 3
    store.unpin("p")  # the parent closing leaves the child's pins in place
    assert store.stats().pinned_blocks == 3
    store.unpin("c")
    assert store.stats().pinned_blocks == 0
    ms.save(stepped(child, [99]))  # the child moves on without touching the parent
    assert ms.load("p").token_ids == list(range(12))
    with pytest.raises(SessionNotFound):
        ms.fork("missing")
    store.close()


def test_delete_is_idempotent(tmp_path: Path) -> None:
    ms = ManifestStore(tmp_path)
    ms.new(session_id="s")
    ms.delete("s")
    ms.delete("s")
    with pytest.raises(SessionNotFound):
        ms.load("s")


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_failed_save_keeps_the_previous_manifest(small_tmpfs: Path) -> None:
    ms = ManifestStore(small_tmpfs)
    before = ms.save(stepped(ms.new(session_id="s"), [1, 2, 3, 4]))
    huge = before.model_copy(update={"token_ids": list(range(100_000))})  # ~600 KB of JSON: does not fit
    with pytest.raises(StorageError):
        ms.save(huge)
    assert ms.load("s") == before
    assert [p.name for p in small_tmpfs.iterdir()] == ["s.manifest"]
