"""The shared block index: which blocks exist, their sizes, last use, and pins with a TTL.

Several engine processes share one store directory, so pins and LRU order must be shared state
that survives crashes. A small SQLite database (WAL journal) gives that: transactions serialise
concurrent pin/evict/insert across processes, a killed process leaves no stale lock, and one
indexed query picks the least-recently-used unpinned blocks. Pin files would need a directory scan
per eviction and their own locking. SQLite's WAL needs shared memory between the processes, so the
index belongs on a local disk (or `journal_mode="DELETE"` on a network file system). The database is
created owner-only (0o600); SQLite gives its -wal, -shm and -journal files the database's mode.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dualpath_sdk.errors import StorageError
from dualpath_sdk.fsutil import PRIVATE_FILE
from dualpath_sdk.kv.keys import BlockKey

Clock = Callable[[], float]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS blocks (key BLOB PRIMARY KEY, nbytes INTEGER NOT NULL, last_used REAL NOT NULL);
CREATE INDEX IF NOT EXISTS blocks_lru ON blocks (last_used);
CREATE TABLE IF NOT EXISTS pins (owner TEXT NOT NULL, key BLOB NOT NULL, expires REAL NOT NULL,
                                 PRIMARY KEY (owner, key));
CREATE INDEX IF NOT EXISTS pins_key ON pins (key, expires);
"""


@dataclass(frozen=True)
class IndexTotals:
    blocks: int
    nbytes: int
    pinned_blocks: int


class BlockIndex:
    """SQLite-backed block index; safe across threads (one lock) and processes (SQLite locking)."""

    def __init__(self, path: Path, clock: Clock, journal_mode: str = "WAL") -> None:
        self.path = path
        self.clock = clock
        self.journal_mode = journal_mode
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1

    def _db(self) -> sqlite3.Connection:
        """The connection of this process: a forked child must not reuse its parent's."""
        if self._conn is None or self._pid != os.getpid():
            try:  # create it owner-only: sqlite3 would make it 0o644 (less the umask)
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE))
            except OSError as exc:
                raise StorageError(f"block index {self.path}: {exc}") from exc
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA journal_mode={self.journal_mode}")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def _write(self, fn: Callable[[sqlite3.Connection], object]) -> object:
        """Run `fn` in one IMMEDIATE transaction; SQLite failures (disk full, I/O) become StorageError."""
        with self._lock:
            try:
                db = self._db()
                db.execute("BEGIN IMMEDIATE")
                try:
                    result = fn(db)
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
                return result
            except sqlite3.Error as exc:
                raise StorageError(f"block index {self.path}: {exc}") from exc

    def _read(self, sql: str, args: Sequence[object] = ()) -> list[tuple[object, ...]]:
        with self._lock:
            try:
                return self._db().execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise StorageError(f"block index {self.path}: {exc}") from exc

    def add(self, key: BlockKey, nbytes: int) -> None:
        now = self.clock()
        self._write(
            lambda db: db.execute(
                "INSERT INTO blocks VALUES (?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET last_used=excluded.last_used",
                (key, nbytes, now),
            )
        )

    def touch(self, keys: Iterable[BlockKey]) -> None:
        """Mark blocks as just used (LRU order); one transaction for a whole batch of reads."""
        now = self.clock()
        rows = [(now, k) for k in keys]
        if rows:
            self._write(lambda db: db.executemany("UPDATE blocks SET last_used=? WHERE key=?", rows))

    def remove(self, key: BlockKey) -> None:
        self._write(lambda db: db.execute("DELETE FROM blocks WHERE key=?", (key,)))

    def pin(self, owner: str, keys: Sequence[BlockKey], ttl_s: float) -> int:
        """Pin (or extend the pin of) `owner` on every indexed key; returns how many were pinned."""
        expires = self.clock() + ttl_s

        def fn(db: sqlite3.Connection) -> int:
            pinned = 0
            for key in keys:
                if db.execute("SELECT 1 FROM blocks WHERE key=?", (key,)).fetchone():
                    db.execute(
                        "INSERT INTO pins VALUES (?, ?, ?) ON CONFLICT(owner, key) "
                        "DO UPDATE SET expires=excluded.expires",
                        (owner, key, expires),
                    )
                    pinned += 1
            return pinned

        return int(self._write(fn))  # type: ignore[call-overload]

    def unpin(self, owner: str, keys: Sequence[BlockKey] | None = None) -> None:
        """Drop `owner`'s pins on `keys`, or all of its pins."""
        if keys is None:
            self._write(lambda db: db.execute("DELETE FROM pins WHERE owner=?", (owner,)))
        else:
            rows = [(owner, k) for k in keys]
            self._write(lambda db: db.executemany("DELETE FROM pins WHERE owner=? AND key=?", rows))

    def is_pinned(self, key: BlockKey) -> bool:
        rows = self._read("SELECT 1 FROM pins WHERE key=? AND expires>? LIMIT 1", (key, self.clock()))
        return bool(rows)

    def take_victims(self, capacity_bytes: int, incoming: int = 0, strict: bool = False) -> list[BlockKey]:
        """Remove least-recently-used unpinned blocks from the index until `incoming` more bytes fit.

        Returns the removed keys (the caller deletes their data after this commit). With `strict`,
        raises StorageError, removing nothing, when pinned blocks alone leave no room.
        """
        now = self.clock()

        def fn(db: sqlite3.Connection) -> list[BlockKey]:
            db.execute("DELETE FROM pins WHERE expires<=?", (now,))
            total = db.execute("SELECT COALESCE(SUM(nbytes), 0) FROM blocks").fetchone()[0]
            excess = total + incoming - capacity_bytes
            if excess <= 0:
                return []
            victims: list[BlockKey] = []
            freed = 0
            cursor = db.execute(
                "SELECT key, nbytes FROM blocks WHERE key NOT IN (SELECT key FROM pins) ORDER BY last_used"
            )
            for key, nbytes in cursor:
                if freed >= excess:
                    break
                victims.append(key)
                freed += nbytes
            if freed < excess and strict:
                raise StorageError(
                    f"store over capacity: {total + incoming} > {capacity_bytes} bytes and only "
                    f"{freed} bytes are unpinned"
                )
            db.executemany("DELETE FROM blocks WHERE key=?", [(k,) for k in victims])
            return victims

        return list(self._write(fn))  # type: ignore[call-overload]

    def totals(self) -> IndexTotals:
        now = self.clock()
        ((blocks, nbytes),) = self._read("SELECT COUNT(*), COALESCE(SUM(nbytes), 0) FROM blocks")
        ((pinned,),) = self._read(
            "SELECT COUNT(DISTINCT key) FROM pins WHERE expires>? AND key IN (SELECT key FROM blocks)", (now,)
        )
        return IndexTotals(int(blocks), int(nbytes), int(pinned))  # type: ignore[call-overload]

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    # ---- for the operator commands (store/admin.py) --------------------------------------------
    def entries(self) -> list[tuple[BlockKey, int, float]]:
        """Every indexed block: (key, bytes on disk, last used)."""
        rows = self._read("SELECT key, nbytes, last_used FROM blocks")
        return [(bytes(k), int(n), float(t)) for k, n, t in rows]  # type: ignore[call-overload, arg-type]

    def pins(self, owner: str | None = None) -> list[tuple[str, BlockKey, float]]:
        """Pins, live and expired (all, or `owner`'s): (owner, key, expires)."""
        if owner is None:
            rows = self._read("SELECT owner, key, expires FROM pins")
        else:
            rows = self._read("SELECT owner, key, expires FROM pins WHERE owner=?", (owner,))
        return [(str(o), bytes(k), float(e)) for o, k, e in rows]  # type: ignore[call-overload, arg-type]

    def drop_expired_pins(self) -> list[tuple[str, BlockKey, float]]:
        """Remove the pins whose TTL has run out; returns them (owner, key, expires)."""
        now = self.clock()

        def fn(db: sqlite3.Connection) -> list[tuple[str, BlockKey, float]]:
            rows = db.execute("SELECT owner, key, expires FROM pins WHERE expires<=?", (now,)).fetchall()
            db.execute("DELETE FROM pins WHERE expires<=?", (now,))
            return [(str(o), bytes(k), float(e)) for o, k, e in rows]

        return list(self._write(fn))  # type: ignore[call-overload]

    def remove_unpinned(self, keys: Sequence[BlockKey]) -> list[BlockKey]:
        """Forget those of `keys` that no live pin protects, in one transaction; returns them (the
        caller deletes their data after this commit, as after `take_victims`)."""
        now = self.clock()

        def fn(db: sqlite3.Connection) -> list[BlockKey]:
            removed = []
            for key in keys:
                pinned = db.execute("SELECT 1 FROM pins WHERE key=? AND expires>?", (key, now)).fetchone()
                if not pinned and db.execute("DELETE FROM blocks WHERE key=?", (key,)).rowcount:
                    removed.append(key)
            return removed

        return list(self._write(fn))  # type: ignore[call-overload]
