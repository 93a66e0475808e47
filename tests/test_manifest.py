"""Session manifests: atomic saves, typed errors for missing and damaged files, forks that pin, and
one writer per session (leases across handles and processes, compare-and-swap saves)."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import xxhash

from dualpath_sdk.errors import (
    InvalidInput,
    ManifestCorrupt,
    SessionBusy,
    SessionNotFound,
    StorageError,
)
from dualpath_sdk.kv.block import FullBlock, KVLayout
from dualpath_sdk.kv.keys import block_keys, namespace_key
from dualpath_sdk.store.fs import FsStore
from dualpath_sdk.store.manifest import MANIFEST_VERSION, ManifestStore, SessionManifest
from tests.conftest import mounted_tmpfs

LAYOUT = KVLayout(num_layers=2, block_size=4, num_kv_heads=1, head_dim=8)
ROOT = namespace_key("m", "float32", 4)
REPO = Path(__file__).resolve().parents[1]


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
    with mounted_tmpfs(tmp_path / "small", "256k") as mount:
        yield mount


def test_failed_save_keeps_the_previous_manifest(small_tmpfs: Path) -> None:
    ms = ManifestStore(small_tmpfs)
    before = ms.save(stepped(ms.new(session_id="s"), [1, 2, 3, 4]))
    huge = before.model_copy(update={"token_ids": list(range(100_000))})  # ~600 KB of JSON: does not fit
    with pytest.raises(StorageError):
        ms.save(huge)
    assert ms.load("s") == before
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["s.lock", "s.manifest"]


# ---- one writer per session: versions, leases, compare-and-swap ----


def test_every_save_bumps_the_version_and_old_files_load_as_version_0(tmp_path: Path) -> None:
    ms = ManifestStore(tmp_path)
    m = ms.new(session_id="s")
    assert m.version == 1 and ms.load("s").version == 1
    assert ms.save(stepped(m, [1])).version == 2
    assert ms.save(stepped(m, [1])).version == 3  # a plain save writes above the file's version
    assert ms.fork("s", "c").version == 1
    # A file written before the field existed: no "version" in its body.
    body = SessionManifest(session_id="old", token_ids=[5, 6]).model_dump_json(exclude={"version"}).encode()
    assert b'"version"' not in body
    ms.path_of("old").write_bytes(
        f"DPSESSION {MANIFEST_VERSION} {xxhash.xxh3_64_hexdigest(body)}\n".encode() + body
    )
    old = ms.load("old")
    assert old.version == 0 and old.token_ids == [5, 6]
    assert ms.save(stepped(old, [7]), expect_version=0).version == 1


def test_a_second_lease_in_one_process_is_busy_until_the_first_ends(tmp_path: Path) -> None:
    ms = ManifestStore(tmp_path)
    other = ManifestStore(tmp_path)  # another handle's store on the same directory
    m = ms.new(session_id="s")
    with ms.lease("s") as lease:
        assert lease.held and ms.lock_path("s").exists()
        with pytest.raises(SessionBusy):
            ms.lease("s")
        with pytest.raises(SessionBusy):
            other.lease("s")
        with pytest.raises(SessionBusy):  # a CAS save takes the lock: busy even for the lease's own store
            ms.save(stepped(m, [1]), expect_version=1)
        with pytest.raises(SessionBusy):
            ms.delete("s")
        ms.lease("t").release()  # other sessions are not held up
        m = lease.save(stepped(m, [1]))
        assert m.version == 2
    assert not lease.held
    with pytest.raises(InvalidInput):
        lease.save(m)
    with other.lease("s") as again:
        assert again.check(m) == ms.load("s")
    ms.lease("s").release()


def test_flock_alone_makes_two_descriptors_of_one_process_conflict(tmp_path: Path) -> None:
    """The in-process table is a second line: on a local disk the kernel lock conflicts by itself."""
    ms = ManifestStore(tmp_path)
    with ms.lease("s"):
        fd = os.open(ms.lock_path("s"), os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)


def _child(code: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


def test_a_lease_held_by_another_process_is_busy_and_a_killed_holder_releases_it(tmp_path: Path) -> None:
    ms = ManifestStore(tmp_path)
    m = ms.new(session_id="s")
    child = _child(
        f"""
        import time
        from pathlib import Path
        from dualpath_sdk.store.manifest import ManifestStore
        lease = ManifestStore(Path({str(tmp_path)!r})).lease("s")
        print("held", flush=True)
        time.sleep(120)
        """
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        with pytest.raises(SessionBusy):
            ms.lease("s")
        with pytest.raises(SessionBusy):
            ms.save(stepped(m, [1]), expect_version=1)
        with pytest.raises(SessionBusy):
            ms.delete("s")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    with ms.lease("s") as lease:  # the kernel dropped the dead holder's lock
        assert lease.save(stepped(m, [1])).version == 2


def test_a_forked_child_neither_holds_nor_releases_its_parents_lease(tmp_path: Path) -> None:
    ms = ManifestStore(tmp_path)
    with ms.lease("s") as lease:
        pid = os.fork()
        if pid == 0:  # the child: dropping its copy must leave the parent's lock alone
            code = 0
            try:
                lease.release()
                ManifestStore(tmp_path).lease("s")  # the parent still holds it: busy
                code = 1
            except SessionBusy:
                pass
            except BaseException:
                code = 2
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        fd = os.open(ms.lock_path("s"), os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)


def test_a_stale_compare_and_swap_raises_and_writes_nothing(tmp_path: Path) -> None:
    ms = ManifestStore(tmp_path)
    a = ms.new(session_id="s")
    b = ms.load("s")  # a second handle, resumed at the same version
    a = ms.save(stepped(a, [1, 2]), expect_version=a.version)
    assert a.version == 2
    before = ms.path_of("s").read_bytes()
    with pytest.raises(SessionBusy, match="version 2 on disk, this handle has 1"):
        ms.save(stepped(b, [9]), expect_version=b.version)
    with ms.lease("s") as lease:
        with pytest.raises(SessionBusy, match="resume it"):
            lease.check(b)
        with pytest.raises(SessionBusy):
            lease.save(stepped(b, [9]))
        with pytest.raises(InvalidInput):
            lease.save(ms.new(session_id="elsewhere"))
    assert ms.path_of("s").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # A missing file matches only version 0 (a new session); a deleted session is not resurrected.
    with pytest.raises(SessionBusy, match="deleted"):
        ms.save(SessionManifest(session_id="fresh", version=3), expect_version=3)
    assert not ms.path_of("fresh").exists()
    assert ms.save(SessionManifest(session_id="fresh"), expect_version=0).version == 1
    ms.delete("s")
    assert not ms.path_of("s").exists() and not ms.lock_path("s").exists()
    with pytest.raises(SessionBusy):
        ms.save(stepped(a, [3]), expect_version=a.version)


_RACER = """
import json, random, sys, time
from pathlib import Path
from dualpath_sdk.errors import SessionBusy
from dualpath_sdk.store.manifest import ManifestStore
root, me, n = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
ms = ManifestStore(root)
rng = random.Random(me)
wins, busy, stale = [], 0, 0
print("ready", flush=True)
sys.stdin.readline()  # start together: the racers' imports take longer than their saves
while len(wins) < n:
    token = 1000 * me + len(wins)
    try:
        if rng.random() < 0.5:  # a step: lease, then CAS through it
            with ms.lease("s") as lease:
                m = lease.load()
                time.sleep(rng.random() * 0.002)  # the step's work
                lease.save(m.model_copy(update={"token_ids": [*m.token_ids, token]}))
        else:  # a bare CAS save of what was read without the lease: often stale by then
            m = ms.load("s")
            time.sleep(rng.random() * 0.002)
            ms.save(m.model_copy(update={"token_ids": [*m.token_ids, token]}), expect_version=m.version)
        wins.append(token)
    except SessionBusy as exc:
        busy += 1
        stale += "changed by another handle" in str(exc)
        time.sleep(rng.random() * 0.002)
print(json.dumps({"wins": wins, "busy": busy, "stale": stale}), flush=True)
"""


def test_racing_processes_lose_no_update(tmp_path: Path) -> None:
    ms = ManifestStore(tmp_path)
    ms.new(session_id="s")
    n = 25
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(tmp_path), str(me), str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            cwd=REPO,
        )
        for me in (1, 2)
    ]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    results = [json.loads(out) for out in outs]
    wins = [r["wins"] for r in results]
    final = ms.load("s")
    assert final.version == 1 + 2 * n  # created as 1, +1 per successful save
    assert len(final.token_ids) == 2 * n
    for me, mine in zip((1, 2), wins, strict=True):  # every success is there, in its order
        assert [t for t in final.token_ids if t // 1000 == me] == mine
    assert sum(r["stale"] for r in results) > 0, "no save was ever stale; the test proved nothing"
    assert sum(r["busy"] - r["stale"] for r in results) > 0, "the lock never contended"
