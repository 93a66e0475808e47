"""Operating a persistent store without a cluster: list, inspect and delete sessions, measure usage,
collect garbage. `dualpath sessions ...` and `dualpath store ...` print what these functions return.

Only the store is opened (the fs backend: block files, the SQLite index, the manifests under
`<root>/sessions`), never an engine, so it runs beside a live cluster. Two races with one are kept
harmless by age: a block file is renamed into place before its index row is written, and a step's
new blocks are referenced by no manifest until the step commits; garbage collection leaves alone
what is younger than `min_age_s` (default: a step's timeout). What it removes anyway (a block read
at that moment) is a cache miss, which recomputes: never a wrong answer.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from dualpath_sdk.config import StoreConfig
from dualpath_sdk.errors import InvalidInput, SessionNotFound, StorageError
from dualpath_sdk.kv.keys import KEY_BYTES, BlockKey
from dualpath_sdk.store.fs import FsStore
from dualpath_sdk.store.manifest import ManifestStore, SessionManifest

GC_MIN_AGE_S = 600.0  # the controller's step timeout: no running step holds blocks older than this


@dataclass(frozen=True)
class SessionRow:
    session_id: str
    tenant: str
    tokens: int
    blocks: int  # block keys the manifest references
    blocks_present: int  # ... of which the store holds a file
    parent_id: str | None
    created_at: float
    updated_at: float
    pinned_until: float | None  # the session's latest live pin (None: its blocks are evictable)
    damaged: str | None = None  # why the manifest does not load (its other fields are blank)


@dataclass(frozen=True)
class MessageSummary:
    role: str
    chars: int
    preview: str
    tool_calls: list[str] = field(default_factory=list)  # the names of an assistant's calls
    tool_call_id: str | None = None


@dataclass(frozen=True)
class BlockState:
    key: str  # hex
    present: bool  # a block file exists
    nbytes: int | None  # as indexed (None: not in the index)
    pinned_until: float | None  # this session's live pin


@dataclass(frozen=True)
class SessionDetail:
    row: SessionRow
    messages: list[MessageSummary]
    tools: list[str]
    blocks: list[BlockState]

    @property
    def missing(self) -> int:
        return sum(not b.present for b in self.blocks)


@dataclass(frozen=True)
class DeletedSession:
    session_id: str
    tenant: str
    pins_dropped: int
    blocks_removed: int  # with `blocks=True`


@dataclass(frozen=True)
class StoreUsage:
    root: Path
    blocks: int
    stored_bytes: int
    pinned_blocks: int  # blocks with a live pin
    pinned_bytes: int
    unpinned_bytes: int  # evictable under capacity pressure
    expired_pins: int  # pins past their TTL, still recorded (gc drops them)
    capacity_bytes: int | None  # the store's configured cap (None: bounded by the file system)
    fs_total_bytes: int
    fs_free_bytes: int
    sessions: int
    quarantined_files: int  # damaged blocks moved aside for inspection
    quarantined_bytes: int


@dataclass(frozen=True)
class PinRow:
    owner: str
    key: str
    expires: float


@dataclass(frozen=True)
class BlockRow:
    key: str
    nbytes: int


@dataclass(frozen=True)
class OrphanFile:
    path: Path
    nbytes: int


@dataclass(frozen=True)
class GcReport:
    dry_run: bool
    expired_pins: list[PinRow]
    orphan_files: list[OrphanFile]  # block files the index does not know
    stale_rows: list[BlockRow]  # index rows whose file is gone
    unreferenced: list[BlockRow]  # blocks no manifest references and no live pin protects

    @property
    def freed_bytes(self) -> int:
        return sum(f.nbytes for f in self.orphan_files) + sum(b.nbytes for b in self.unreferenced)


class StoreAdmin:
    """One store opened for operator commands; use as a context manager."""

    def __init__(self, config: StoreConfig, clock: Callable[[], float] = time.time) -> None:
        if config.backend != "fs":
            raise InvalidInput(f"the store commands read the fs backend, not {config.backend!r}")
        root = Path(config.root)
        if not any((root / name).exists() for name in ("index.sqlite", "blocks", "sessions")):
            raise StorageError(f"no store at {root}")
        self.config = config
        self.root = root
        self.clock = clock
        self.store = FsStore(
            root, read_threads=1, index_journal=config.index_journal, clock=clock, index=config.index
        )
        self.manifests = ManifestStore(root / "sessions", clock=clock)

    # ---- sessions ---------------------------------------------------------------------------------
    def sessions(self, tenant: str | None = None) -> list[SessionRow]:
        """Every session (of `tenant`), oldest first; damaged manifests last, with the reason."""
        live = self._live_pins_by_owner()
        rows, damaged = [], []
        for path in sorted(self.manifests.root.glob("*.manifest")):
            try:
                m = self.manifests.load(path.stem)
            except SessionNotFound:
                continue  # deleted meanwhile
            except (StorageError, InvalidInput) as exc:
                if tenant is None:
                    damaged.append(_damaged_row(path.stem, str(exc)))
                continue
            if tenant is None or m.tenant == tenant:
                rows.append(self._row(m, live.get(m.session_id)))
        return sorted(rows, key=lambda r: r.created_at) + damaged

    def show(self, session_id: str) -> SessionDetail:
        m = self.manifests.load(session_id)
        pins = {key: expires for _, key, expires in self.store.index.pins(session_id)}
        sizes = {key: nbytes for key, nbytes, _ in self.store.index.entries()}
        now = self.clock()
        blocks = [
            BlockState(
                key.hex(),
                self.store.contains(key),
                sizes.get(key),
                pins[key] if pins.get(key, 0.0) > now else None,
            )
            for key in m.keys
        ]
        live = [e for e in pins.values() if e > now]
        return SessionDetail(
            self._row(m, max(live, default=None)),
            [_summary(msg) for msg in m.messages],
            [str(t.get("function", {}).get("name", "?")) for t in m.tools],
            blocks,
        )

    def delete(self, session_id: str, blocks: bool = False) -> DeletedSession:
        """The manifest (SessionBusy while a step runs) and the session's pins: its blocks become
        evictable, and `gc(unreferenced=True)` removes those no other session references. With
        `blocks`, those are removed now (the session's, that no other manifest references and no
        other live pin protects)."""
        pins = self.store.index.pins(session_id)
        mine = {key for _, key, _ in pins}
        try:
            manifest = self.manifests.load(session_id)
            tenant = manifest.tenant
            mine.update(manifest.keys)
        except SessionNotFound:
            if not pins:
                raise
            tenant = "?"
        except StorageError:  # damaged: deleting it is the way out
            tenant = "?"
        self.manifests.delete(session_id)
        self.store.unpin(session_id)
        removed: list[BlockKey] = []
        if blocks:
            removed = self.store.index.remove_unpinned(sorted(mine - self._referenced()))
            for key in removed:
                self.store.path_of(key).unlink(missing_ok=True)
        return DeletedSession(session_id, tenant, len(pins), len(removed))

    # ---- the store --------------------------------------------------------------------------------
    def usage(self) -> StoreUsage:
        now = self.clock()
        entries = self.store.index.entries()
        pins = self.store.index.pins()
        live = {key for _, key, expires in pins if expires > now}
        stored = sum(n for _, n, _ in entries)
        pinned = [n for key, n, _ in entries if key in live]
        try:
            st = os.statvfs(self.root)
        except OSError as exc:
            raise StorageError(f"{self.root}: {exc}") from exc
        quarantined = [p.stat().st_size for p in (self.root / "quarantine").glob("*") if p.is_file()]
        return StoreUsage(
            root=self.root,
            blocks=len(entries),
            stored_bytes=stored,
            pinned_blocks=len(pinned),
            pinned_bytes=sum(pinned),
            unpinned_bytes=stored - sum(pinned),
            expired_pins=sum(expires <= now for _, _, expires in pins),
            capacity_bytes=self.config.capacity_bytes,
            fs_total_bytes=st.f_blocks * st.f_frsize,
            fs_free_bytes=st.f_bavail * st.f_frsize,
            sessions=sum(1 for _ in self.manifests.root.glob("*.manifest")),
            quarantined_files=len(quarantined),
            quarantined_bytes=sum(quarantined),
        )

    def gc(
        self, unreferenced: bool = False, dry_run: bool = False, min_age_s: float = GC_MIN_AGE_S
    ) -> GcReport:
        """Drop expired pins, block files the index does not know (older than `min_age_s`) and index
        rows whose file is gone; with `unreferenced`, also blocks that no manifest references, no live
        pin protects and nothing used for `min_age_s`. `dry_run`: report, change nothing."""
        if min_age_s < 0:
            raise InvalidInput(f"min_age_s must be >= 0, not {min_age_s}")
        index = self.store.index
        now = self.clock()
        cutoff = now - min_age_s
        referenced = self._referenced() if unreferenced else set()  # before anything changes
        expired = [p for p in index.pins() if p[2] <= now] if dry_run else index.drop_expired_pins()
        entries = {key: (nbytes, last_used) for key, nbytes, last_used in index.entries()}
        files = self._block_files()
        orphans = [
            OrphanFile(path, size)
            for key, (path, size, mtime) in files.items()
            if key not in entries and mtime <= cutoff
        ]
        stale = [BlockRow(key.hex(), nbytes) for key, (nbytes, _) in entries.items() if key not in files]
        removed: list[BlockRow] = []
        if unreferenced:
            live = {key for _, key, expires in index.pins() if expires > now}
            candidates = [
                key
                for key, (_, last_used) in entries.items()
                if key in files and key not in referenced and key not in live and last_used <= cutoff
            ]
            if not dry_run:
                candidates = index.remove_unpinned(candidates)
            removed = [BlockRow(key.hex(), entries[key][0]) for key in candidates]
        if not dry_run:
            for orphan in orphans:
                orphan.path.unlink(missing_ok=True)
            for row in stale:
                key = bytes.fromhex(row.key)
                if not self.store.contains(key):  # not written again meanwhile
                    index.remove(key)
            for row in removed:
                self.store.path_of(bytes.fromhex(row.key)).unlink(missing_ok=True)
        pins = [PinRow(owner, key.hex(), expires) for owner, key, expires in expired]
        return GcReport(dry_run, pins, orphans, stale, removed)

    # ---- internals --------------------------------------------------------------------------------
    def _row(self, m: SessionManifest, pinned_until: float | None) -> SessionRow:
        present = sum(self.store.contains(key) for key in m.keys)
        return SessionRow(
            m.session_id,
            m.tenant,
            len(m.token_ids),
            len(m.block_keys),
            present,
            m.parent_id,
            m.created_at,
            m.updated_at,
            pinned_until,
        )

    def _live_pins_by_owner(self) -> dict[str, float]:
        now = self.clock()
        latest: dict[str, float] = {}
        for owner, _, expires in self.store.index.pins():
            if expires > now:
                latest[owner] = max(expires, latest.get(owner, 0.0))
        return latest

    def _referenced(self) -> set[BlockKey]:
        """Every block key some manifest references; a manifest that does not load stops the
        collection (its references are unknown)."""
        keys: set[BlockKey] = set()
        for path in self.manifests.root.glob("*.manifest"):
            try:
                keys.update(self.manifests.load(path.stem).keys)
            except SessionNotFound:
                continue
            except (StorageError, InvalidInput) as exc:
                raise StorageError(
                    f"cannot collect unreferenced blocks: {exc} (delete or repair that session first)"
                ) from exc
        return keys

    def _block_files(self) -> dict[BlockKey, tuple[Path, int, float]]:
        """Block files by key: (path, size, mtime). A file whose name is no key gets a key that no
        row has (its path's bytes), so it counts as an orphan."""
        files: dict[BlockKey, tuple[Path, int, float]] = {}
        for path in (self.root / "blocks").glob("*/*"):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue  # evicted meanwhile
            if not path.is_file():
                continue
            files[_key_of(path)] = (path, st.st_size, st.st_mtime)
        return files

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> StoreAdmin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def open_admin(root: Path | None = None, capacity_bytes: int | None = None) -> Iterator[StoreAdmin]:
    """The store at `root` (default: StoreConfig's, under the cache directory) for operator commands."""
    config = StoreConfig(**({} if root is None else {"root": Path(root)}), capacity_bytes=capacity_bytes)
    with StoreAdmin(config) as admin:
        yield admin


def _key_of(path: Path) -> BlockKey:
    stem = path.name.removesuffix(".kv")
    if path.suffix == ".kv" and len(stem) == 2 * KEY_BYTES and stem[:2] == path.parent.name:
        try:
            return bytes.fromhex(stem)
        except ValueError:
            pass
    return str(path).encode()


def _damaged_row(session_id: str, reason: str) -> SessionRow:
    return SessionRow(session_id, "?", 0, 0, 0, None, 0.0, 0.0, None, damaged=reason)


def _summary(message: dict[str, object]) -> MessageSummary:
    content = message.get("content")
    if isinstance(content, list):  # text parts
        content = "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    text = content if isinstance(content, str) else ""
    calls = message.get("tool_calls")
    names = (
        [str(c.get("function", {}).get("name", "?")) for c in calls if isinstance(c, dict)]
        if isinstance(calls, list)
        else []
    )
    call_id = message.get("tool_call_id")
    return MessageSummary(
        str(message.get("role", "?")),
        len(text),
        " ".join(text.split())[:72],
        names,
        call_id if isinstance(call_id, str) else None,
    )
