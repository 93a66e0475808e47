"""Owner-only files and directories: what the store and the transports create is private by default.

KV blocks, session manifests (prompts, messages) and the shared-memory regions that carry KV between
engines are user data, so everything the SDK creates is readable by its owner only: directories
0o700, files 0o600, whatever the process umask. Files get the mode at creation (`os.open(...,
PRIVATE_FILE)`: a umask can only narrow it). Directories are made one level at a time with
`make_private_dirs`, which also chmods each one it made (mkdir's mode is masked by the umask, and
`Path.mkdir(parents=True)` gives the parents default modes). Paths that already exist keep their
modes: a directory made by an older version, or chosen by the operator, is theirs to tighten.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from dualpath_sdk.errors import StorageError

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def make_private_dirs(path: Path) -> list[Path]:
    """`mkdir -p path` where every directory this call creates is owner-only (0o700, umask or not);
    existing directories are left as they are. Returns the directories it created, outermost first."""
    path = Path(path)
    missing: list[Path] = []
    p = path
    while not p.is_dir() and p != p.parent:
        missing.append(p)
        p = p.parent
    created: list[Path] = []
    for d in reversed(missing):
        try:
            os.mkdir(d, PRIVATE_DIR)
        except FileExistsError:
            if not d.is_dir():
                raise
            continue  # another process made it first: its mode is its maker's business
        os.chmod(d, PRIVATE_DIR)  # the umask may have masked the owner's own bits
        created.append(d)
    return created


def check_writable(root: Path) -> None:
    """StorageError unless `root` (made if missing) takes a small file: created, fsynced, removed.
    A store that cannot be written fails at start, not as a silent erosion of the cache later."""
    probe = Path(root) / f".probe-{os.getpid()}-{uuid.uuid4().hex}"
    try:
        make_private_dirs(Path(root))
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
        try:
            os.write(fd, b"dualpath")
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as exc:
        raise StorageError(f"the store at {root} cannot be written: {exc}") from exc


def write_private_file(tmp: Path, final: Path, data: bytes) -> None:
    """Make `final` hold `data`, whole or not at all: written to the owner-only `tmp` (same directory
    tree), fsynced, renamed over `final`; `tmp` is removed on failure. Durable once the caller fsyncs
    `final`'s directory. Raises OSError."""
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
