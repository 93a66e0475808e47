"""Which session a whole-history request continues: OpenAI's API (and LangChain, and LlamaIndex)
send the conversation every time, the cluster keeps it as a session whose KV-Cache the next turn
reuses.

A request goes to the session it names (`session_id`) when its history is a prefix of the request,
else to the tenant's session with the longest history that is: stepped in place with only the new
messages when the session's whole history is a prefix, forked at its latest mark inside the common
prefix when an earlier message was edited (the session itself stays as it was), or a new session.
Messages compare canonically (`canonical`), and a session's tools must equal the request's: they
are in its KV (the system prompt).

Each session is indexed by a digest of its history at each of its marks, chained over the messages
and seeded with its tools, so a request hashes its own messages once and finds its longest match
without reading a manifest. The index is per tenant, built from the store at the tenant's first
request and updated after each step through this `History`; it is only a hint: the chosen session
is resumed and checked against the request before it is stepped, and a step refuses a session
another handle moved on meanwhile (SessionBusy: then it is forked), so a stale entry never
continues the wrong KV. Sessions stepped elsewhere after the index was built are found once stepped
here.

One `History` serves a local `Cluster` or a `RemoteCluster` (`Cluster.connect`) alike, from any
number of threads and event loops: `step` is the sync face, `astep` the async one, over the same
matching (which runs in a worker thread on the async face: it resumes sessions, blocking calls).
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from hashlib import blake2b
from typing import Any, Protocol

import anyio.to_thread

from dualpath_sdk.api.remote import RemoteCluster
from dualpath_sdk.api.result import StepChunk, StepResult
from dualpath_sdk.api.session import Session
from dualpath_sdk.errors import InvalidInput, SessionBusy, SessionNotFound, StorageError
from dualpath_sdk.model.tools import tool_schemas

Event = StepChunk | StepResult


class Sessions(Protocol):
    """What `History` needs of a cluster: `Cluster` and `RemoteCluster` both are one."""

    def session(
        self,
        system: str | None = None,
        session_id: str | None = None,
        tenant: str = ...,
        ttl_s: float = ...,
    ) -> Session: ...

    def resume(self, session_id: str, tenant: str = ...) -> Session: ...

    def sessions(self, tenant: str = ...) -> list[str]: ...


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
    """One tenant's sessions by the digest of their history at each usable mark (not locked: the
    `History` holding it is)."""

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


class StepEvents(Iterator[Event]):
    """A started step's events: its first one, the rest of its chunks, then its StepResult. The
    step ends (and its session is re-indexed) at the result, at an error, or at `close()` (also as
    a context manager's exit), which cancels a step still running and leaves its session as it was."""

    def __init__(self, first: Event, rest: Iterator[Event], done: Callable[[], None]) -> None:
        self._next: Event | None = first
        self._rest = rest
        self._done = done
        self._closed = False

    def __next__(self) -> Event:
        if self._closed:
            raise StopIteration
        item, self._next = self._next, None
        if item is None:
            try:
                item = next(self._rest)
            except BaseException:
                self.close()
                raise
        if isinstance(item, StepResult):
            self.close()
        return item

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            close = getattr(self._rest, "close", None)
            if close is not None:
                close()
        finally:
            self._done()

    def __enter__(self) -> StepEvents:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncStepEvents(AsyncIterator[Event]):
    """`StepEvents` for `astep`: ends at the result, an error, or `aclose()` (`async with`)."""

    def __init__(self, first: Event, rest: AsyncGenerator[Event, None], done: Callable[[], None]) -> None:
        self._next: Event | None = first
        self._rest = rest
        self._done = done
        self._closed = False

    async def __anext__(self) -> Event:
        if self._closed:
            raise StopAsyncIteration
        item, self._next = self._next, None
        if item is None:
            try:
                item = await anext(self._rest)
            except BaseException:
                await self.aclose()
                raise
        if isinstance(item, StepResult):
            await self.aclose()
        return item

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._rest.aclose()
        finally:
            self._done()

    async def __aenter__(self) -> AsyncStepEvents:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class History:
    """Maps whole-history requests onto a cluster's sessions (one per gateway app, or per model
    object of an adapter). Thread-safe; `step` and `astep` may run at once from anywhere."""

    def __init__(self, cluster: Sessions) -> None:
        self._cluster = cluster
        self._tenants: dict[str | None, _Index] = {}
        self._lock = threading.Lock()  # the indexes
        self._building = threading.Lock()  # one tenant's index built at a time

    # ---- the two faces -----------------------------------------------------------------------------

    def step(
        self,
        messages: list[dict[str, Any]],
        *,
        tenant: str | None = None,
        session_id: str | None = None,
        **options: Any,
    ) -> tuple[Session, StepEvents]:
        """Step the session that holds `messages` (a whole conversation, the new messages last) with
        what it does not hold yet: (that session, the step's events). Blocks until the step started;
        an error before its first event is raised here. `options` are the step's (tools, tool
        choice, sampling...); its tools are part of the match. `tenant` None: the cluster's own (a
        local cluster's "default", a remote one's API key's)."""
        key, options, tools = self._request(messages, tenant, options)
        match = self.match(key, messages, tools, session_id)
        session = self._fork(key, match.session, match.at) if not match.in_place else match.session
        new = messages[match.held :]
        events = session.events(new, **options)
        try:
            first = next(events)
        except SessionBusy:
            if not match.in_place:
                raise  # a fork of our own is busy: not a race forking again would win
            session = self._fork(key, match.session, match.at)
            events = session.events(new, **options)
            first = next(events)
        return session, StepEvents(first, events, partial(self._record, key, session))

    async def astep(
        self,
        messages: list[dict[str, Any]],
        *,
        tenant: str | None = None,
        session_id: str | None = None,
        **options: Any,
    ) -> tuple[Session, AsyncStepEvents]:
        """`step` without blocking the event loop (any anyio loop: asyncio or trio)."""
        key, options, tools = self._request(messages, tenant, options)
        match = await anyio.to_thread.run_sync(self.match, key, messages, tools, session_id)
        session = match.session
        if not match.in_place:
            session = await anyio.to_thread.run_sync(self._fork, key, match.session, match.at)
        new = messages[match.held :]
        events = session.aevents(new, **options)
        try:
            first = await anext(events)
        except SessionBusy:
            if not match.in_place:
                raise
            session = await anyio.to_thread.run_sync(self._fork, key, match.session, match.at)
            events = session.aevents(new, **options)
            first = await anext(events)
        return session, AsyncStepEvents(first, events, partial(self._record, key, session))

    # ---- the matching (blocking calls) ----------------------------------------------------------

    def match(
        self,
        tenant: str | None,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        session_id: str | None = None,
    ) -> Match:
        """The session (of `tenant`) to step for a request of `messages` and `tools`."""
        index = self._index(tenant)
        want = digests(messages, tools)
        if session_id is not None:
            named, created = self._named(tenant, session_id)
            if created or not (named.messages or named.marks[-1][1]):  # new, or never stepped
                return Match(named, len(named.marks) - 1, 0, True)
            with self._lock:
                index.add(named)
            found = self._fit(named, want)
            if found is not None:
                return found
        with self._lock:
            candidates = index.candidates(want)[:4]
        for sid in candidates:  # a stale entry is refreshed and the next one tried
            try:
                session = self._cluster.resume(sid, **_tenant(tenant))
            except (SessionNotFound, StorageError):
                with self._lock:
                    index.remove(sid)
                continue
            with self._lock:
                index.add(session)
            found = self._fit(session, want)
            if found is not None:
                return found
        return Match(self._cluster.session(**_tenant(tenant)), 0, 0, True)

    def record(self, session: Session, tenant: str | None = None) -> None:
        """Index the session as it is now (after a step, or a failed one: as it was), under
        `tenant` (None: the session's own)."""
        self._record(session.tenant if tenant is None else tenant, session)

    def _record(self, key: str | None, session: Session) -> None:
        with self._lock:
            index = self._tenants.get(key)
            if index is not None:
                index.add(session)

    def _request(
        self, messages: list[dict[str, Any]], tenant: str | None, options: dict[str, Any]
    ) -> tuple[str | None, dict[str, Any], list[dict[str, Any]]]:
        """(the index's key for `tenant`, the step's options with its tools normalized, the tools)."""
        if not isinstance(messages, list) or not messages:
            raise InvalidInput("messages must be a non-empty list")
        tools = tool_schemas(options.get("tools"))
        if options.get("tools") is not None:
            options = {**options, "tools": tools}
        if tenant is None and not isinstance(self._cluster, RemoteCluster):
            tenant = "default"  # a local cluster's own: one index whether it is named or not
        return tenant, options, tools

    def _fit(self, session: Session, want: list[bytes]) -> Match | None:
        found = fit(session, want)
        if found is None:
            return None
        at, held = found
        return Match(session, at, held, at == len(session.marks) - 1)

    def _index(self, tenant: str | None) -> _Index:
        with self._lock:
            index = self._tenants.get(tenant)
        if index is not None:
            return index
        with self._building:
            with self._lock:
                index = self._tenants.get(tenant)
            if index is None:
                index = self._build(tenant)
                with self._lock:
                    self._tenants[tenant] = index
        return index

    def _build(self, tenant: str | None) -> _Index:
        index = _Index()
        for sid in self._cluster.sessions(**_tenant(tenant)):
            try:
                index.add(self._cluster.resume(sid, **_tenant(tenant)))
            except (SessionNotFound, StorageError):
                continue  # deleted meanwhile, or damaged
        return index

    def _named(self, tenant: str | None, session_id: str) -> tuple[Session, bool]:
        """The tenant's session of that id, or a new one created with it: (session, created)."""
        try:
            return self._cluster.resume(session_id, **_tenant(tenant)), False
        except SessionNotFound:
            pass
        try:
            return self._cluster.session(session_id=session_id, **_tenant(tenant)), True
        except InvalidInput:  # it exists: created meanwhile, or another tenant's (never stepped here)
            try:
                return self._cluster.resume(session_id, **_tenant(tenant)), False
            except SessionNotFound:
                raise SessionNotFound(
                    f"no session {session_id!r} here, and the id is taken: choose another"
                ) from None

    def _fork(self, key: str | None, session: Session, at: int) -> Session:
        child = session.fork(at)
        self._record(key, child)
        return child


def _tenant(tenant: str | None) -> dict[str, Any]:
    """The tenant as a keyword: none for None (the cluster's own)."""
    return {} if tenant is None else {"tenant": tenant}
