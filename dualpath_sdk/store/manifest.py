"""Session manifests: what a session is between turns (its token ids, messages and block keys).

A manifest is saved after every step, atomically (temp file, fsync, rename, directory fsync), so a
crash leaves the previous step's manifest or the new one, never a mix. The file is one line
`DPSESSION <format> <xxh3 of the body>` and then the JSON body, so a damaged file is detected, not
half-trusted. Token ids are the truth: block keys are derived from them and kept to pin and look up
blocks without rehashing.

One writer per session. Two handles of one session (resumed twice in one process, or in two
processes) must not both step it: the second step's save would silently drop the first's turn. Two
mechanisms together make that impossible for callers that use them:

- The lease: `ManifestStore.lease(session_id)` takes an exclusive, non-blocking `flock` on
  `<root>/<session_id>.lock` and holds it for one step; while it is held every other lease, CAS
  save, `new`, `delete` of that session, in this process or another, raises SessionBusy at once.
  flock locks belong to the open file description, so two handles in one process conflict just as
  two processes do, and the kernel drops the lock when its holder dies (SIGKILL included): a crashed
  step never leaves a session stuck. Within a process leases are also tracked in a table, so two
  handles conflict there even where flock is emulated.
- The version: every save bumps `SessionManifest.version` (a save counter; files written before it
  existed load as version 0). A compare-and-swap save (`save(m, expect_version=v)`, or
  `Lease.save(m)`, which expects `m.version`) writes only if the file on disk still has
  version v, else raises SessionBusy and writes nothing: a handle that missed another handle's step
  learns it must resume, instead of overwriting that step. The read-compare-rename runs under the
  session's lock, so it is atomic across processes.

How a step uses them: `with store.lease(sid) as lease:` then `lease.check(manifest)` (fail fast,
before any work, if another handle moved the session on), run the step, `manifest =
lease.save(stepped)`. Inside a lease save through the lease: `ManifestStore.save(...,
expect_version=...)` takes the lock itself and so reports the session busy even to its own holder
(never a deadlock, never a silent double-lock). A plain `save(m)` (no expect_version) takes no lock
and overwrites: it is for a handle that knows it is alone (a session just created); it still writes
a version above the one on disk, so CAS handles notice it.

Where: flock works on local file systems. On NFS, Linux emulates flock with POSIX (fcntl) byte-range
locks, which the NFS lock manager enforces between hosts but which belong to a process, not a file
description: between processes the lease still holds; within one process the table above stands
in. Other network file systems may not enforce locks between hosts at all: there, keep one node's
sessions on one host. Lock files stay after a session's last step (they are tiny); `delete` removes
the lock file with the manifest, and a lease taken on a lock file deleted meanwhile retries on the
new one, so two handles never hold "the" lock on two different files.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import xxhash
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dualpath_sdk.errors import (
    InvalidInput,
    ManifestCorrupt,
    SessionBusy,
    SessionNotFound,
    StorageError,
)
from dualpath_sdk.fsutil import PRIVATE_FILE, make_private_dirs, write_private_file
from dualpath_sdk.kv.keys import BlockKey
from dualpath_sdk.store.backend import BlockStore

MANIFEST_VERSION = 1  # the file format; `SessionManifest.version` counts saves of one session
_MAGIC = "DPSESSION"
_SESSION_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


class SessionManifest(BaseModel):
    """A session between turns. `block_keys` are hex strings of the chain keys of its full blocks.

    `version` counts the saves of the session (1 once created, +1 per save; 0: never saved, or a file
    from before the field): what a compare-and-swap save compares."""

    model_config = ConfigDict(extra="forbid")

    session_id: str = Field(pattern=_SESSION_ID.pattern)
    tenant: str = "default"
    parent_id: str | None = None
    token_ids: list[int] = Field(default_factory=list)
    messages: list[dict[str, Any]] = Field(default_factory=list)
    block_keys: list[str] = Field(default_factory=list)
    tools: list[dict[str, Any]] = Field(default_factory=list)  # fixed by the first step that names them
    # (messages, tokens) at the start and after each step: where a fork may cut the history
    marks: list[tuple[int, int]] = Field(default_factory=list)
    ttl_s: float = Field(3600.0, gt=0)
    created_at: float = 0.0
    updated_at: float = 0.0
    version: int = Field(0, ge=0)

    @property
    def keys(self) -> list[BlockKey]:
        return [bytes.fromhex(k) for k in self.block_keys]

    def with_keys(self, keys: list[BlockKey]) -> SessionManifest:
        return self.model_copy(update={"block_keys": [k.hex() for k in keys]})


# The leases this process holds, by (manifest dir device, inode, session id). flock alone already
# makes two handles of one process conflict; this table keeps that true where flock is emulated by
# per-process POSIX locks (NFS), and is checked before the lock file is even opened (closing any
# descriptor of a file drops the process's POSIX locks on it).
_held: set[tuple[int, int, str]] = set()
_held_lock = threading.Lock()


def _reset_held() -> None:
    """A forked child holds none of its parent's leases (it must not release them either)."""
    global _held, _held_lock
    _held, _held_lock = set(), threading.Lock()


os.register_at_fork(after_in_child=_reset_held)


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd`."""
    opened = os.fstat(fd)
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino)


class Lease:
    """The exclusive right to step one session, from `ManifestStore.lease` until `release` (or the
    end of the `with` block). Save through it: `save` is a compare-and-swap under the held lock."""

    def __init__(self, store: ManifestStore, session_id: str, fd: int, key: tuple[int, int, str]) -> None:
        self.store = store
        self.session_id = session_id
        self._fd = fd
        self._key = key
        self._pid = os.getpid()
        self._lock = threading.Lock()

    @property
    def held(self) -> bool:
        return self._fd >= 0 and self._pid == os.getpid()

    def _require(self) -> None:
        if self._fd < 0:
            raise InvalidInput(f"the lease on session {self.session_id} was released")
        if self._pid != os.getpid():
            raise InvalidInput(f"the lease on session {self.session_id} belongs to the parent process")

    def load(self) -> SessionManifest:
        """The session as saved (SessionNotFound if it has no manifest)."""
        with self._lock:
            self._require()
            return self.store.load(self.session_id)

    def check(self, manifest: SessionManifest) -> SessionManifest:
        """Raise SessionBusy, as `save` would, unless the file on disk is still at `manifest.version`
        (another handle stepped or deleted the session since this one loaded it); returns what is on
        disk. Call it before a step's work, so a stale handle fails before doing any."""
        with self._lock:
            self._require()
            self._same_session(manifest)
            return self.store._compare(self.session_id, manifest.version)

    def save(self, manifest: SessionManifest, expect_version: int | None = None) -> SessionManifest:
        """Compare-and-swap: write `manifest` only if the file on disk has version `expect_version`
        (default `manifest.version`; a missing file matches only 0), else SessionBusy and nothing is
        written. Returns what was saved: version expect_version + 1, `updated_at` stamped."""
        with self._lock:
            self._require()
            self._same_session(manifest)
            expect = manifest.version if expect_version is None else expect_version
            self.store._compare(self.session_id, expect)
            return self.store._write(manifest, expect + 1)

    def _same_session(self, manifest: SessionManifest) -> None:
        if manifest.session_id != self.session_id:
            raise InvalidInput(f"the lease is on session {self.session_id}, not on {manifest.session_id}")

    def release(self) -> None:
        """Give the session up (idempotent); the next lease, here or in any process, may take it."""
        with self._lock:
            if self._fd < 0:
                return
            fd, self._fd = self._fd, -1
            if self._pid != os.getpid():  # a forked child's copy: closing it leaves the parent's lock
                os.close(fd)
                return
            try:  # explicitly: a child forked meanwhile shares the descriptor and would keep the lock
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
            with _held_lock:
                _held.discard(self._key)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # a lease dropped without release must not hold the session forever
        with contextlib.suppress(Exception):
            self.release()


class ManifestStore:
    """Manifests as files `<root>/<session_id>.manifest`, lock files `<root>/<session_id>.lock`;
    safe for several processes (atomic renames; leases and CAS saves for one writer per session)."""

    def __init__(self, root: Path, clock: Callable[[], float] = time.time) -> None:
        self.root = Path(root)
        make_private_dirs(self.root)
        st = os.stat(self.root)
        self._root_id = (st.st_dev, st.st_ino)
        self.clock = clock

    def path_of(self, session_id: str) -> Path:
        if not _SESSION_ID.match(session_id):
            raise InvalidInput(f"session id {session_id!r} must match {_SESSION_ID.pattern}")
        return self.root / f"{session_id}.manifest"

    def lock_path(self, session_id: str) -> Path:
        self.path_of(session_id)  # validates the id
        return self.root / f"{session_id}.lock"

    # -- the lease ----------------------------------------------------------------------------------
    def lease(self, session_id: str) -> Lease:
        """Take the session's lease now, or raise SessionBusy at once if any other handle (this
        process or another) holds it. Use as `with store.lease(sid) as lease:` around one step; the
        session need not exist yet. A killed holder's lease is released by the kernel."""
        path = self.lock_path(session_id)
        key = (*self._root_id, session_id)
        with _held_lock:
            if key in _held:
                raise SessionBusy(f"session {session_id} is already running a step (another handle)")
            _held.add(key)
        try:
            fd = self._flock(session_id, path)
        except BaseException:
            with _held_lock:
                _held.discard(key)
            raise
        return Lease(self, session_id, fd, key)

    @staticmethod
    def _flock(session_id: str, path: Path) -> int:
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE)
            except OSError as exc:
                raise StorageError(f"opening the lock of session {session_id}: {exc}") from exc
            current = False
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise SessionBusy(
                        f"session {session_id} is already running a step (another handle holds its lease)"
                    ) from None
                except OSError as exc:
                    raise StorageError(f"locking session {session_id}: {exc}") from exc
                current = _same_file(fd, path)
            finally:
                if not current:  # busy, failed, or `delete` removed this lock file after we opened it
                    os.close(fd)
            if current:
                return fd

    # -- saving -------------------------------------------------------------------------------------
    def new(
        self, tenant: str = "default", ttl_s: float = 3600.0, session_id: str | None = None
    ) -> SessionManifest:
        """A fresh, saved manifest (version 1); a given `session_id` must not exist yet."""
        now = self.clock()
        return self._create(
            SessionManifest(
                session_id=session_id or uuid.uuid4().hex,
                tenant=tenant,
                ttl_s=ttl_s,
                created_at=now,
                marks=[(0, 0)],
            )
        )

    def _create(self, manifest: SessionManifest) -> SessionManifest:
        """Save `manifest` as version 1 of a session that must not exist (checked under its lock)."""
        sid = manifest.session_id
        if self.path_of(sid).exists():  # the common case, without touching a lock file
            raise InvalidInput(f"session {sid} already exists")
        with self.lease(sid):
            if self.path_of(sid).exists():
                raise InvalidInput(f"session {sid} already exists")
            return self._write(manifest, 1)

    def save(self, manifest: SessionManifest, expect_version: int | None = None) -> SessionManifest:
        """Stamp `updated_at`, bump `version` and replace the stored manifest atomically; returns
        what was saved.

        With `expect_version` it is a compare-and-swap, atomic across processes: written only if the
        file on disk has exactly that version (a missing file matches only 0: a new session), as
        version expect_version + 1; else SessionBusy and nothing is written. It takes the session's
        lock for the read-compare-rename, so it also raises SessionBusy while any lease on the
        session is held, this store's own included: inside a lease, save with `lease.save`.

        Without `expect_version` the save is unconditional (last writer wins, no lock): only for a
        handle alone on its session. It writes the version above both the file's and the manifest's."""
        if expect_version is not None:
            with self.lease(manifest.session_id) as lease:
                return lease.save(manifest, expect_version)
        try:
            disk = self._disk_version(manifest.session_id)
        except ManifestCorrupt:
            disk = None
        return self._write(manifest, max(manifest.version, disk or 0) + 1)

    def _disk_version(self, session_id: str) -> int | None:
        try:
            return self.load(session_id).version
        except SessionNotFound:
            return None

    def _compare(self, session_id: str, expect: int) -> SessionManifest:
        """The manifest on disk if it is at version `expect` (a missing one is version 0 and returned
        as a blank manifest); SessionBusy otherwise. The caller holds the session's lock."""
        try:
            disk = self.load(session_id)
        except SessionNotFound:
            if expect == 0:
                return SessionManifest(session_id=session_id)
            raise SessionBusy(
                f"session {session_id} was changed by another handle (deleted on disk, this handle "
                f"has version {expect}): resume it"
            ) from None
        if disk.version != expect:
            raise SessionBusy(
                f"session {session_id} was changed by another handle (version {disk.version} on "
                f"disk, this handle has {expect}): resume it"
            )
        return disk

    def _write(self, manifest: SessionManifest, version: int) -> SessionManifest:
        """Write `manifest` as `version`, atomically (temp file, fsync, rename, directory fsync)."""
        saved = manifest.model_copy(update={"updated_at": self.clock(), "version": version})
        body = saved.model_dump_json().encode()
        data = f"{_MAGIC} {MANIFEST_VERSION} {xxhash.xxh3_64_hexdigest(body)}\n".encode() + body
        final = self.path_of(saved.session_id)
        tmp = self.root / f".{saved.session_id}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        try:
            write_private_file(tmp, final, data)
            self._fsync_root()
        except OSError as exc:
            raise StorageError(f"saving session {saved.session_id}: {exc}") from exc
        return saved

    def _fsync_root(self) -> None:
        dfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    # -- reading, forking, deleting -------------------------------------------------------------------
    def load(self, session_id: str) -> SessionManifest:
        path = self.path_of(session_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise SessionNotFound(f"no session {session_id!r}") from None
        except OSError as exc:
            raise StorageError(f"reading session {session_id}: {exc}") from exc
        head, _, body = data.partition(b"\n")
        parts = head.split(b" ")
        if len(parts) != 3 or parts[0] != _MAGIC.encode() or parts[1] != str(MANIFEST_VERSION).encode():
            raise ManifestCorrupt(f"session {session_id}: not a version {MANIFEST_VERSION} manifest")
        if parts[2] != xxhash.xxh3_64_hexdigest(body).encode():
            raise ManifestCorrupt(f"session {session_id}: checksum mismatch")
        try:
            manifest = SessionManifest.model_validate_json(body)
        except ValidationError as exc:
            raise ManifestCorrupt(f"session {session_id}: {exc}") from exc
        if manifest.session_id != session_id:
            raise ManifestCorrupt(f"file of session {session_id} holds session {manifest.session_id}")
        return manifest

    def all(self) -> list[SessionManifest]:
        """Every session's manifest that loads (a damaged one is skipped: `load` says why)."""
        manifests = []
        for path in sorted(self.root.glob("*.manifest")):
            try:
                manifests.append(self.load(path.stem))
            except (SessionNotFound, StorageError, InvalidInput):
                continue  # deleted meanwhile, or damaged
        return manifests

    def fork(
        self,
        session_id: str,
        child_id: str | None = None,
        blocks: BlockStore | None = None,
        at: tuple[int, int] | None = None,
        keys_of: Callable[[list[int]], list[BlockKey]] | None = None,
    ) -> SessionManifest:
        """A new session (version 1) that starts where `session_id` is, sharing (and pinning for
        itself) its blocks. The parent is read as last saved; it needs no lease.

        `at`, one of the parent's marks, cuts the child's history there: its first `at[0]` messages
        and `at[1]` tokens, whose block keys `keys_of` gives (the keys of the rest are not its)."""
        parent = self.load(session_id)
        marks, messages, tokens, keys = parent.marks, parent.messages, parent.token_ids, parent.keys
        if at is not None:
            if at not in marks or keys_of is None:
                raise InvalidInput(f"{at} is not a mark of session {session_id}: {marks}")
            marks = marks[: marks.index(at) + 1]
            messages, tokens = messages[: at[0]], tokens[: at[1]]
            keys = keys_of(tokens)
        child = self._create(
            SessionManifest(
                session_id=child_id or uuid.uuid4().hex,
                tenant=parent.tenant,
                parent_id=parent.session_id,
                token_ids=list(tokens),
                messages=[dict(m) for m in messages],
                block_keys=[k.hex() for k in keys],
                tools=parent.tools if tokens else [],
                marks=list(marks),
                ttl_s=parent.ttl_s,
                created_at=self.clock(),
            )
        )
        if blocks is not None:
            blocks.pin(child.session_id, child.keys, child.ttl_s)
        return child

    def delete(self, session_id: str) -> None:
        """Forget a session (idempotent), manifest and lock file; its blocks stay until unpinned and
        evicted. SessionBusy, deleting nothing, while a handle holds its lease (is mid-step)."""
        manifest, lock = self.path_of(session_id), self.lock_path(session_id)
        if not manifest.exists() and not lock.exists():
            return
        with self.lease(session_id):
            try:
                manifest.unlink(missing_ok=True)
                lock.unlink(missing_ok=True)  # lease() re-checks the inode it locked: see _flock
                self._fsync_root()
            except OSError as exc:
                raise StorageError(f"deleting session {session_id}: {exc}") from exc
