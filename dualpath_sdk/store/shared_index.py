"""The fs store's index for a directory that several hosts share (a network file system): files only.

The SQLite index (index.py) needs shared memory between its processes (WAL) and byte-range locks a
network file system may not honour, so cluster mode keeps no database: every fact lives in a file
that one atomic operation changes, and any host derives the rest.

- Presence and size: the block files themselves (renamed into place complete, store/fs.py).
- Last use: the block file's mtime, set to the store's clock when written and on a read (at most
  once per `touch_every_s`, so hot blocks do not turn every read into a metadata write).
- Pins: one file per owner (a session) under `pins/`, `{key: expires}`, rewritten whole by temp file
  and rename. Only that owner writes it, and a session has one writer at a time (its manifest lease,
  store/manifest.py), so no update is lost; readers see the old map or the new one.
- Eviction: whoever needs room takes the sweep lease (`sweep.lease`, created O_EXCL, holding an
  expiry; one left by a dead sweeper is broken by rename once it expired), lists the blocks, and
  renames the least recently used unpinned ones into `trash/`. It then reads the pins again: a block
  pinned meanwhile is linked back, the rest are unlinked. A pin is written before its `pin` call
  checks that the block exists, so a pin that `pin` reports never loses its block; a reader that had
  opened a block before its rename reads it whole (POSIX) or fails and counts a miss (NFS: ESTALE),
  and every read is checked against its header's checksum: never a torn block.
- Capacity: each process counts its own writes on top of the last listing and lists again when over
  capacity or when the listing is older than `rescan_s`, so the store may overshoot by what other
  hosts wrote within that time. A sweep frees `headroom` of the capacity beyond what the write needs,
  so its listing (O(blocks): 65 ms for 10,000 blocks on a local disk) serves many writes.
- Clocks: pins and the lease carry their holder's wall clock; another host honours them `skew_s`
  longer, so clocks kept within that (NTP) never evict a live pin.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from dualpath_sdk.errors import StorageError
from dualpath_sdk.fsutil import PRIVATE_FILE, make_private_dirs, write_private_file
from dualpath_sdk.kv.keys import BlockKey
from dualpath_sdk.store.index import Clock, IndexTotals

log = logging.getLogger(__name__)
LEASE_FILE = "sweep.lease"


class SharedIndex:
    """BlockIndex's interface over the files of `root`; safe across hosts that share the directory."""

    def __init__(
        self,
        root: Path,
        path_of: Callable[[BlockKey], Path],
        clock: Clock,
        touch_every_s: float = 1.0,
        skew_s: float = 1.0,
        rescan_s: float = 2.0,
        lease_s: float = 30.0,
        headroom: float = 0.05,
    ) -> None:
        self.root = Path(root)
        self.path_of = path_of
        self.clock = clock
        self.touch_every_s = touch_every_s
        self.skew_s = skew_s
        self.rescan_s = rescan_s
        self.lease_s = lease_s
        self.headroom = headroom
        self._lock = threading.Lock()
        self._prefix = f"{socket.gethostname()}-"
        self._total: int | None = None  # bytes stored, as last listed plus this process's writes since
        self._listed_at = -float("inf")
        for sub in ("pins", "trash", "tmp"):
            make_private_dirs(self.root / sub)

    # ---- blocks -----------------------------------------------------------------------------------
    def _list(self) -> dict[BlockKey, tuple[int, float]]:
        """Every block file: its size and mtime (its last use)."""
        found: dict[BlockKey, tuple[int, float]] = {}
        for shard in sorted((self.root / "blocks").iterdir()):
            with contextlib.suppress(FileNotFoundError), os.scandir(shard) as entries:
                for entry in entries:
                    if entry.name.endswith(".kv"):
                        try:
                            st = entry.stat()
                        except FileNotFoundError:  # evicted meanwhile
                            continue
                        found[bytes.fromhex(entry.name[:-3])] = (st.st_size, st.st_mtime)
        return found

    def add(self, key: BlockKey, nbytes: int) -> None:
        """A block just renamed into place: its last use is now, by this store's clock."""
        now = self.clock()
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.path_of(key), (now, now))
        with self._lock:
            if self._total is not None:
                self._total += nbytes

    def touch(self, keys: Iterable[BlockKey]) -> None:
        now = self.clock()
        for key in keys:
            path = self.path_of(key)
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_mtime < now - self.touch_every_s:
                    os.utime(path, (now, now))

    def remove(self, key: BlockKey) -> None:
        """The block's file was moved away (quarantined): list again before the next capacity check."""
        with self._lock:
            self._listed_at = -float("inf")

    # ---- pins -------------------------------------------------------------------------------------
    def _pin_file(self, owner: str) -> Path:
        return self.root / "pins" / f"{hashlib.sha256(owner.encode()).hexdigest()[:32]}.pin"

    @staticmethod
    def _load(path: Path) -> tuple[str, dict[BlockKey, float]] | None:
        """A pin file's owner and pins; None when it is gone (or not one: skipped with a warning)."""
        try:
            body = json.loads(path.read_bytes())
            return str(body["owner"]), {bytes.fromhex(k): float(e) for k, e in body["pins"].items()}
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("pin file %s skipped: %s", path, exc)
            return None

    def _save(self, owner: str, pins: dict[BlockKey, float]) -> None:
        """Replace `owner`'s pin file whole (temp file, fsync, rename); no pins: remove it."""
        path = self._pin_file(owner)
        try:
            if not pins:
                path.unlink(missing_ok=True)
                return
            tmp = self.root / "tmp" / f"{self._prefix}{os.getpid()}-{uuid.uuid4().hex}.pin"
            body = json.dumps({"owner": owner, "pins": {k.hex(): e for k, e in pins.items()}}).encode()
            write_private_file(tmp, path, body)
        except OSError as exc:
            raise StorageError(f"pins of {owner} in {self.root}: {exc}") from exc

    def pin(self, owner: str, keys: Sequence[BlockKey], ttl_s: float) -> int:
        """Pin (or extend) `owner`'s pins on the stored keys; returns how many are stored and pinned.
        The pin is written first and presence checked after, which the sweeper's re-check relies on."""
        now = self.clock()
        present = [k for k in keys if self.path_of(k).exists()]
        if not present:
            return 0
        with self._lock:
            loaded = self._load(self._pin_file(owner))
            pins = {k: e for k, e in (loaded[1] if loaded else {}).items() if e > now}
            pins.update(dict.fromkeys(present, now + ttl_s))
            self._save(owner, pins)
        return sum(self.path_of(k).exists() for k in present)

    def unpin(self, owner: str, keys: Sequence[BlockKey] | None = None) -> None:
        with self._lock:
            loaded = None if keys is None else self._load(self._pin_file(owner))
            dropped = set(keys or ())
            self._save(owner, {k: e for k, e in (loaded[1] if loaded else {}).items() if k not in dropped})

    def pins(self, owner: str | None = None) -> list[tuple[str, BlockKey, float]]:
        """Pins, live and expired (all, or `owner`'s): (owner, key, expires)."""
        files = [self._pin_file(owner)] if owner is not None else sorted((self.root / "pins").glob("*.pin"))
        rows = []
        for path in files:
            loaded = self._load(path)
            if loaded is not None:
                rows += [(loaded[0], key, expires) for key, expires in loaded[1].items()]
        return rows

    def _protected(self) -> set[BlockKey]:
        """Keys some pin protects, honoured `skew_s` past their expiry (the pinner's clock may lag)."""
        now = self.clock()
        return {key for _, key, expires in self.pins() if expires + self.skew_s > now}

    def is_pinned(self, key: BlockKey) -> bool:
        now = self.clock()
        return any(k == key and e > now for _, k, e in self.pins())

    def drop_expired_pins(self) -> list[tuple[str, BlockKey, float]]:
        """Remove the pin files whose every pin has expired (an owner drops its own expired pins when
        it pins again); returns the pins dropped. A file its owner rewrote meanwhile is put back."""
        now = self.clock()
        dropped = []
        for path in sorted((self.root / "pins").glob("*.pin")):
            loaded = self._load(path)
            if loaded is None or any(e + self.skew_s > now for e in loaded[1].values()):
                continue
            aside = self.root / "tmp" / f"{self._prefix}{os.getpid()}-{uuid.uuid4().hex}.pin"
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue
            again = self._load(aside)
            if again is not None and any(e + self.skew_s > now for e in again[1].values()):
                with contextlib.suppress(FileExistsError):
                    os.link(aside, path)
            else:
                dropped += [(loaded[0], key, expires) for key, expires in loaded[1].items()]
            aside.unlink(missing_ok=True)
        return dropped

    # ---- eviction ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _sweeping(self, wait_s: float = 10.0) -> Iterator[None]:
        """Hold the sweep lease: one sweeper at a time across hosts (a dead one's lease expires)."""
        lease = self.root / LEASE_FILE
        token = f"{self._prefix}{os.getpid()}-{uuid.uuid4().hex}"
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fd = os.open(lease, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
            except FileExistsError:
                holder = _read_json(lease)
                if holder is not None and self._expired(lease, holder):
                    broken = self.root / "tmp" / f"{token}.lease"
                    with contextlib.suppress(FileNotFoundError):
                        os.rename(lease, broken)  # of two breakers one wins; the other retries
                        broken.unlink()
                    continue
                if time.monotonic() > deadline:
                    raise StorageError(f"the sweep lease {lease} is held: {holder}") from None
                time.sleep(0.01)
                continue
            except OSError as exc:
                raise StorageError(f"sweep lease {lease}: {exc}") from exc
            try:
                os.write(fd, json.dumps({"token": token, "expires": self.clock() + self.lease_s}).encode())
            finally:
                os.close(fd)
            break
        try:
            yield
        finally:
            mine = _read_json(lease)
            if mine is not None and mine.get("token") == token:
                lease.unlink(missing_ok=True)

    def _expired(self, lease: Path, holder: dict[str, object]) -> bool:
        """Whether the lease ended (`skew_s` ago): at the expiry its holder wrote, or, not written yet
        (its holder died at once), `lease_s` after the file's creation by the wall clock."""
        expires = holder.get("expires")
        if isinstance(expires, (int, float)):
            return float(expires) + self.skew_s < self.clock()
        try:
            return lease.stat().st_mtime + self.lease_s + self.skew_s < time.time()
        except FileNotFoundError:
            return True

    def _evict(self, keys: Sequence[BlockKey]) -> list[BlockKey]:
        """Rename `keys` into trash/, then read the pins again: a block pinned meanwhile goes back,
        the others are unlinked. Returns those evicted (by this call)."""
        aside: list[tuple[BlockKey, Path]] = []
        for key in keys:
            trash = self.root / "trash" / f"{self._prefix}{os.getpid()}-{uuid.uuid4().hex}.kv"
            try:
                os.rename(self.path_of(key), trash)
            except FileNotFoundError:  # another host evicted it first
                continue
            except OSError as exc:
                raise StorageError(f"evicting block {key.hex()} from {self.root}: {exc}") from exc
            aside.append((key, trash))
        protected = self._protected() if aside else set()
        evicted = []
        for key, trash in aside:
            if key in protected:
                with contextlib.suppress(FileExistsError):  # written again meanwhile: the same bytes
                    os.link(trash, self.path_of(key))
            else:
                evicted.append(key)
            trash.unlink(missing_ok=True)
        return evicted

    def take_victims(self, capacity_bytes: int, incoming: int = 0, strict: bool = False) -> list[BlockKey]:
        """Evict least-recently-used unpinned blocks until `incoming` more bytes and `headroom` of the
        capacity fit (so one listing serves many writes); returns them (already deleted). With
        `strict`, raises StorageError, evicting nothing, when pinned blocks alone leave no room."""
        with self._lock:
            fresh = time.monotonic() - self._listed_at < self.rescan_s
            if fresh and self._total is not None and self._total + incoming <= capacity_bytes:
                return []
            with self._sweeping():
                blocks = self._list()
                total = sum(n for n, _ in blocks.values())
                excess = total + incoming - capacity_bytes
                victims: list[BlockKey] = []
                if excess > 0:
                    protected = self._protected()
                    freed, target = 0, excess + int(capacity_bytes * self.headroom)
                    for key, (nbytes, _) in sorted(blocks.items(), key=lambda kv: kv[1][1]):
                        if freed >= target:
                            break
                        if key not in protected:
                            victims.append(key)
                            freed += nbytes
                    if freed < excess and strict:
                        raise StorageError(
                            f"store over capacity: {total + incoming} > {capacity_bytes} bytes and only "
                            f"{freed} bytes are unpinned"
                        )
                    victims = self._evict(victims)
                self._total = total - sum(blocks[k][0] for k in victims)
                self._listed_at = time.monotonic()
                return victims

    def remove_unpinned(self, keys: Sequence[BlockKey]) -> list[BlockKey]:
        """Evict those of `keys` that no pin protects; returns them (already deleted)."""
        with self._lock, self._sweeping():
            protected = self._protected()
            self._listed_at = -float("inf")
            return self._evict([k for k in keys if k not in protected])

    # ---- reports ----------------------------------------------------------------------------------
    def totals(self) -> IndexTotals:
        blocks = self._list()
        now = self.clock()
        pinned = {k for _, k, e in self.pins() if e > now and k in blocks}
        return IndexTotals(len(blocks), sum(n for n, _ in blocks.values()), len(pinned))

    def entries(self) -> list[tuple[BlockKey, int, float]]:
        """Every stored block: (key, bytes on disk, last used)."""
        return [(key, nbytes, mtime) for key, (nbytes, mtime) in self._list().items()]

    def recover(self, alive: Callable[[int], bool]) -> None:
        """Remove what dead processes of this host left in trash/ (a sweep cut short)."""
        for path in (self.root / "trash").iterdir():
            if path.name.startswith(self._prefix):
                with contextlib.suppress(ValueError):
                    if not alive(int(path.name[len(self._prefix) :].split("-")[0])):
                        path.unlink(missing_ok=True)

    def close(self) -> None:
        """Nothing held between calls."""


def _read_json(path: Path) -> dict[str, object] | None:
    """A small JSON file's object; None when gone, {} when unreadable (being written, or half
    written by a holder that died)."""
    try:
        body = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:
        return {}
    except OSError as exc:
        raise StorageError(f"{path}: {exc}") from exc
    return body if isinstance(body, dict) else {}
