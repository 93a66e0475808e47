"""Which session a whole-history request continues: OpenAI's API sends the conversation every time,
the cluster keeps it as a session whose KV-Cache the next turn reuses.

A request goes to the session it names (`session_id`) when its history is a prefix of the request,
else to the tenant's session with the longest history that is: stepped in place with only the new
messages when the session's whole history is a prefix, forked at its latest mark inside the common
prefix when an earlier message was edited (the session itself stays as it was), or a new session.
Messages compare canonically (`canonical`), and a session's tools must equal the request's: they
are in its KV (the system prompt).

Each session is indexed by a digest of its history at each of its marks, chained over the messages
and seeded with its tools, so a request hashes its own messages once and finds its longest match
without reading a manifest. The index is per tenant, built from the store at the tenant's first
request and updated after each step through this gateway; it is only a hint: the chosen session is
resumed and checked against the request before it is stepped, and a step refuses a session another
handle moved on meanwhile (SessionBusy: then it is forked), so a stale entry never continues the
wrong KV. Sessions stepped elsewhere after the index was built are found once stepped here.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from hashlib import blake2b
from typing import Any

import anyio
import anyio.to_thread

from dualpath_sdk.api.cluster import Cluster
from dualpath_sdk.api.result import StepChunk, StepResult
from dualpath_sdk.api.session import Session
from dualpath_sdk.errors import InvalidInput, SessionBusy, SessionNotFound, StorageError

Events = AsyncGenerator[StepChunk | StepResult, None]


def canonical(message: Mapping[str, Any]) -> str:
    """What of a message counts: role, content as text (None is "", text parts joined), name,
    tool call id, and tool calls by id, name and arguments (parsed when they are JSON)."""
    content = message.get("content")
    if isinstance(content, list):
        content = "\n".join(part.get("text", "") for part in content if isinstance(part, Mapping))
    calls = []
    for call in message.get("tool_calls") or []:
        fn = call.get("function") or {}
        args = fn.get("arguments")
        if isinstance(args, str):
            with contextlib.suppress(ValueError):  # not JSON: compared as the string it is
                args = json.loads(args)
        calls.append([call.get("id"), fn.get("name"), args])
    return json.dumps(
        [message.get("role"), content or "", message.get("name"), message.get("tool_call_id"), calls],
        sort_keys=True,
        ensure_ascii=False,
    )


def digests(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]) -> list[bytes]:
    """`digests[k]`: the digest of the first k messages under `tools` (k = 0 ... len(messages))."""
    digest = blake2b(json.dumps(list(tools), sort_keys=True).encode(), digest_size=16).digest()
    out = [digest]
    for message in messages:
        digest = blake2b(digest + canonical(message).encode(), digest_size=16).digest()
        out.append(digest)
    return out


def chat_marks(session: Session) -> list[tuple[int, int]]:
    """(index, messages held) of the session's marks a chat request can continue from: those that
    hold some tokens, up to its first step of raw token ids (from there its messages no longer say
    what its tokens are)."""
    marks = session.marks
    usable = []
    for i, (messages, tokens) in enumerate(marks):
        if i > 0 and messages <= marks[i - 1][0]:
            break  # a step of raw token ids adds no message
        if messages > 0 and tokens > 0:
            usable.append((i, messages))
    return usable


@dataclass(frozen=True)
class Match:
    """Where a request's conversation goes: `session` (resumed, checked), stepped from its mark
    `at`, which holds the request's first `held` messages; `in_place` when that mark is its last."""

    session: Session
    at: int
    held: int
    in_place: bool


class _Index:
    """One tenant's sessions by the digest of their history at each usable mark."""

    def __init__(self) -> None:
        self._at: dict[bytes, dict[str, bool]] = {}  # digest -> {session: whether it is its last mark}
        self._digests: dict[str, list[bytes]] = {}

    def add(self, session: Session) -> None:
        """Index the session as it is now (again: its entry moves to the most recent)."""
        self.remove(session.id)
        marks = chat_marks(session)
        messages = session.messages
        if not marks or not messages or messages[-1].get("role") != "assistant":
            return
        chain, last = digests(messages, session.tools), len(session.marks) - 1
        for i, held in marks:
            self._at.setdefault(chain[held], {})[session.id] = i == last
        self._digests[session.id] = [chain[held] for _, held in marks]

    def remove(self, session_id: str) -> None:
        for digest in self._digests.pop(session_id, []):
            holders = self._at[digest]
            holders.pop(session_id, None)
            if not holders:
                del self._at[digest]

    def candidates(self, want: list[bytes]) -> list[str]:
        """Sessions holding the longest prefix of the request (of the digests `want`, all but the
        whole request: it must add a message): in place first, then the most recently indexed."""
        for k in range(len(want) - 2, 0, -1):
            holders = self._at.get(want[k])
            if holders:
                ranked = sorted(reversed(holders.items()), key=lambda item: not item[1])
                return [sid for sid, _ in ranked]
        return []


def fit(session: Session, want: list[bytes]) -> tuple[int, int] | None:
    """(mark index, messages held) of the session's latest usable mark inside the request's common
    prefix with it, checked against its manifest as loaded; None if there is none."""
    chain = digests(session.messages, session.tools)
    for i, held in reversed(chat_marks(session)):
        if held < len(want) - 1 and chain[held] == want[held]:
            return i, held
    return None


class History:
    """Maps whole-history requests onto a cluster's sessions (one per gateway app)."""

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster
        self._tenants: dict[str, _Index] = {}
        self._building = anyio.Lock()

    async def match(
        self,
        tenant: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        session_id: str | None = None,
    ) -> Match:
        """The session (of `tenant`) to step for a request of `messages` and `tools`."""
        index = await self._index(tenant)
        want = digests(messages, tools)
        if session_id is not None:
            named, created = await self._named(tenant, session_id)
            if created or not (named.messages or named.marks[-1][1]):  # new, or never stepped
                return Match(named, len(named.marks) - 1, 0, True)
            index.add(named)
            found = self._match(named, want)
            if found is not None:
                return found
        for sid in index.candidates(want)[:4]:  # a stale entry is refreshed and the next one tried
            try:
                session = await anyio.to_thread.run_sync(self._cluster.resume, sid, tenant)
            except (SessionNotFound, StorageError):
                index.remove(sid)
                continue
            index.add(session)
            found = self._match(session, want)
            if found is not None:
                return found
        return Match(await self._new(tenant), 0, 0, True)

    async def start(
        self, match: Match, messages: list[dict[str, Any]], options: Mapping[str, Any]
    ) -> tuple[Session, StepChunk | StepResult, Events]:
        """Fork if the match says so, and start the step of the request's new messages: the
        session stepped, its first event (errors before it are raised) and the rest. A session
        found busy (another request is stepping it) is forked at the same mark instead."""
        session = match.session
        if not match.in_place:
            session = await self._fork(session, match.at)
        events = session.aevents(messages[match.held :], **options)
        try:
            first = await anext(events)
        except SessionBusy:
            if not match.in_place:
                raise  # a fork of our own is busy: not a race forking again would win
            session = await self._fork(match.session, match.at)
            events = session.aevents(messages[match.held :], **options)
            first = await anext(events)
        return session, first, events

    def record(self, session: Session) -> None:
        """Index the session as it is after a step (or a failed one: as it was)."""
        index = self._tenants.get(session.tenant)
        if index is not None:
            index.add(session)

    def _match(self, session: Session, want: list[bytes]) -> Match | None:
        found = fit(session, want)
        if found is None:
            return None
        at, held = found
        return Match(session, at, held, at == len(session.marks) - 1)

    async def _index(self, tenant: str) -> _Index:
        if tenant not in self._tenants:
            async with self._building:
                if tenant not in self._tenants:
                    self._tenants[tenant] = await anyio.to_thread.run_sync(self._build, tenant)
        return self._tenants[tenant]

    def _build(self, tenant: str) -> _Index:
        index = _Index()
        for sid in self._cluster.sessions(tenant):
            try:
                index.add(self._cluster.resume(sid, tenant))
            except (SessionNotFound, StorageError):
                continue  # deleted meanwhile, or damaged
        return index

    async def _named(self, tenant: str, session_id: str) -> tuple[Session, bool]:
        """The tenant's session of that id, or a new one created with it: (session, created)."""
        resume = partial(self._cluster.resume, session_id, tenant)
        try:
            return await anyio.to_thread.run_sync(resume), False
        except SessionNotFound:
            pass
        try:
            create = partial(self._cluster.session, session_id=session_id, tenant=tenant)
            return await anyio.to_thread.run_sync(create), True
        except InvalidInput:  # it exists: created meanwhile, or another tenant's (never stepped here)
            try:
                return await anyio.to_thread.run_sync(resume), False
            except SessionNotFound:
                raise SessionNotFound(
                    f"no session {session_id!r} here, and the id is taken: choose another"
                ) from None

    async def _new(self, tenant: str) -> Session:
        return await anyio.to_thread.run_sync(partial(self._cluster.session, tenant=tenant))

    async def _fork(self, session: Session, at: int) -> Session:
        child = await session.afork(at)
        self.record(child)
        return child
