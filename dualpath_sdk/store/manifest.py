"""Session manifests: what a session is between turns (its token ids, messages and block keys).

A manifest is saved after every step, atomically (temp file, fsync, rename, directory fsync), so a
crash leaves the previous step's manifest or the new one, never a mix. The file is one line
`DPSESSION <version> <xxh3 of the body>` and then the JSON body, so a damaged file is detected, not
half-trusted. Token ids are the truth: block keys are derived from them and kept to pin and look up
blocks without rehashing.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import xxhash
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dualpath_sdk.errors import InvalidInput, ManifestCorrupt, SessionNotFound, StorageError
from dualpath_sdk.kv.keys import BlockKey
from dualpath_sdk.store.backend import BlockStore

MANIFEST_VERSION = 1
_MAGIC = "DPSESSION"
_SESSION_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


class SessionManifest(BaseModel):
    """A session between turns. `block_keys` are hex strings of the chain keys of its full blocks."""

    model_config = ConfigDict(extra="forbid")

    session_id: str = Field(pattern=_SESSION_ID.pattern)
    tenant: str = "default"
    parent_id: str | None = None
    token_ids: list[int] = Field(default_factory=list)
    messages: list[dict[str, Any]] = Field(default_factory=list)
    block_keys: list[str] = Field(default_factory=list)
    ttl_s: float = Field(3600.0, gt=0)
    created_at: float = 0.0
    updated_at: float = 0.0

    @property
    def keys(self) -> list[BlockKey]:
        return [bytes.fromhex(k) for k in self.block_keys]

    def with_keys(self, keys: list[BlockKey]) -> SessionManifest:
        return self.model_copy(update={"block_keys": [k.hex() for k in keys]})


class ManifestStore:
    """Manifests as files `<root>/<session_id>.manifest`; safe for several processes (atomic renames)."""

    def __init__(self, root: Path, clock: Callable[[], float] = time.time) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.clock = clock

    def path_of(self, session_id: str) -> Path:
        if not _SESSION_ID.match(session_id):
            raise InvalidInput(f"session id {session_id!r} must match {_SESSION_ID.pattern}")
        return self.root / f"{session_id}.manifest"

    def new(
        self, tenant: str = "default", ttl_s: float = 3600.0, session_id: str | None = None
    ) -> SessionManifest:
        """A fresh, saved manifest; a given `session_id` must not exist yet."""
        sid = session_id or uuid.uuid4().hex
        if self.path_of(sid).exists():
            raise InvalidInput(f"session {sid} already exists")
        now = self.clock()
        return self.save(SessionManifest(session_id=sid, tenant=tenant, ttl_s=ttl_s, created_at=now))

    def save(self, manifest: SessionManifest) -> SessionManifest:
        """Stamp `updated_at` and replace the stored manifest atomically; returns what was saved."""
        saved = manifest.model_copy(update={"updated_at": self.clock()})
        body = saved.model_dump_json().encode()
        data = f"{_MAGIC} {MANIFEST_VERSION} {xxhash.xxh3_64_hexdigest(body)}\n".encode() + body
        final = self.path_of(saved.session_id)
        tmp = self.root / f".{saved.session_id}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, final)
            dfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"saving session {saved.session_id}: {exc}") from exc
        return saved

    def load(self, session_id: str) -> SessionManifest:
        path = self.path_of(session_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise SessionNotFound(session_id) from None
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

    def fork(
        self, session_id: str, child_id: str | None = None, blocks: BlockStore | None = None
    ) -> SessionManifest:
        """A new session that starts where `session_id` is, sharing (and pinning for itself) its blocks."""
        parent = self.load(session_id)
        child = self.new(parent.tenant, parent.ttl_s, child_id)
        child = self.save(
            child.model_copy(
                update={
                    "parent_id": parent.session_id,
                    "token_ids": list(parent.token_ids),
                    "messages": [dict(m) for m in parent.messages],
                    "block_keys": list(parent.block_keys),
                }
            )
        )
        if blocks is not None:
            blocks.pin(child.session_id, child.keys, child.ttl_s)
        return child

    def delete(self, session_id: str) -> None:
        """Forget a session (idempotent); its blocks stay until unpinned and evicted."""
        self.path_of(session_id).unlink(missing_ok=True)
