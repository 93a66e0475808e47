"""Session: one agent conversation whose KV-Cache outlives each turn, with a sync and an async face.

`Session` is the public face; a `LocalSession` (a `Cluster.local`'s) drives the I/O-free step flow
(api/flow.py) on both faces: `step` / `stream` perform its effects with blocking calls, `astep` /
`astream` with awaits (anyio: any asyncio or trio program), moving every blocking call off the
event loop. A `RemoteSession` (api/remote.py) has the same faces over HTTP. Leaving a step early
(an error, a `break` out of a stream, a cancelled task, a timeout) cancels it on the engines and
leaves the session as it was.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio.to_thread

from dualpath_sdk.api.backend import Backend
from dualpath_sdk.api.flow import (
    Commit,
    Emit,
    Flow,
    Lookup,
    PreparedStep,
    Receive,
    Stop,
    Submit,
    prepare,
    step_flow,
)
from dualpath_sdk.api.inputs import StepOptions, TokenTurn, turn_messages, validated
from dualpath_sdk.api.result import StepChunk, StepResult
from dualpath_sdk.errors import InvalidInput, SessionBusy
from dualpath_sdk.store.manifest import Lease, SessionManifest

Message = Mapping[str, Any]
Turn = str | Message | Sequence[Message]


@dataclass(frozen=True)
class CheckedTurn:
    """A turn that passed the boundary checks: a chat turn's messages, or raw token ids."""

    messages: list[dict[str, Any]] | None
    token_ids: list[int] | None
    options: StepOptions


class Session:
    """One agent conversation: its faces (sync and async) and its state as last saved.

    What a step does is the subclass's: `LocalSession` runs the step flow against an embedded cluster,
    `RemoteSession` (api/remote.py) asks a gateway to. Steps run one at a time, across handles and
    processes (SessionBusy otherwise); a failed step leaves the session as it was. After `close()` (or
    the cluster's) steps raise InvalidInput.
    """

    def __init__(self, manifest: SessionManifest) -> None:
        self._manifest = manifest
        self._closed = False

    @property
    def id(self) -> str:
        return self._manifest.session_id

    @property
    def tenant(self) -> str:
        return self._manifest.tenant

    @property
    def token_ids(self) -> list[int]:
        return list(self._manifest.token_ids)

    @property
    def messages(self) -> list[dict[str, Any]]:
        return [dict(m) for m in self._manifest.messages]

    @property
    def tools(self) -> list[dict[str, Any]]:
        """The function schemas in the session's KV, fixed by its first step that named them."""
        return [dict(t) for t in self._manifest.tools]

    @property
    def version(self) -> int:
        """Saves of the session so far: a handle whose version is behind the store's is stale."""
        return self._manifest.version

    @property
    def marks(self) -> list[tuple[int, int]]:
        """(messages, tokens) at the session's start and after each of its steps: the points of its
        history `fork(at=i)` can branch from."""
        return list(self._manifest.marks)

    # ---- the sync face ------------------------------------------------------------------------

    def step(self, turn: Turn, **options: Any) -> StepResult:
        """One turn: a user string, a message, or a list of messages (tool results, ...).

        Keywords: max_tokens, temperature, top_p, seed, stop_token_ids, ignore_eos, read_plan,
        stop (strings that end the reply), tools (OpenAI function schemas: `r.tool_calls`).
        """
        return _last(self._run(self._chat(turn, options)))

    def step_tokens(self, token_ids: Sequence[int], **options: Any) -> StepResult:
        """One turn given as raw token ids appended to the session's tokens (no chat template)."""
        return _last(self._run(self._tokens(token_ids, options)))

    def stream(self, turn: Turn, **options: Any) -> Iterator[StepChunk]:
        """Like step, yielding text as it is generated."""
        for item in self._run(self._chat(turn, options)):
            if isinstance(item, StepChunk):
                yield item

    def events(
        self, turn: Turn | None = None, token_ids: Sequence[int] | None = None, **options: Any
    ) -> Iterator[StepChunk | StepResult]:
        """A step's chunks as they come, then its StepResult (what `step` and `stream` are made of):
        for a chat `turn` or for raw `token_ids`, exactly one of the two."""
        return self._run(self._either(turn, token_ids, options))

    def fork(self, at: int | None = None) -> Session:
        """A new session that shares every cached block of this one; with `at`, it holds this
        session's history only up to `marks[at]` (0: the start, before any step)."""
        self._check_open()
        return self._fork(self._mark(at))

    def close(self) -> None:
        """Drop the session's pin on its blocks (they become evictable); the manifest stays, so the
        session can be resumed. This handle refuses further steps."""
        if not self._closed:
            self._closed = True
            self._close()

    # ---- the async face -----------------------------------------------------------------------

    async def astep(self, turn: Turn, **options: Any) -> StepResult:
        """`step` without blocking the event loop."""
        return await _alast(self._arun(self._chat(turn, options)))

    async def astep_tokens(self, token_ids: Sequence[int], **options: Any) -> StepResult:
        return await _alast(self._arun(self._tokens(token_ids, options)))

    async def astream(self, turn: Turn, **options: Any) -> AsyncIterator[StepChunk]:
        async for item in self._arun(self._chat(turn, options)):
            if isinstance(item, StepChunk):
                yield item

    def aevents(
        self, turn: Turn | None = None, token_ids: Sequence[int] | None = None, **options: Any
    ) -> AsyncGenerator[StepChunk | StepResult, None]:
        return self._arun(self._either(turn, token_ids, options))

    async def afork(self, at: int | None = None) -> Session:
        return await anyio.to_thread.run_sync(self.fork, at)

    async def aclose(self) -> None:
        await anyio.to_thread.run_sync(self.close)

    # ---- what a kind of session implements ---------------------------------------------------------

    def _run(self, turn: CheckedTurn) -> Iterator[StepChunk | StepResult]:
        """Run one step: its chunks, then its result."""
        raise NotImplementedError

    def _arun(self, turn: CheckedTurn) -> AsyncGenerator[StepChunk | StepResult, None]:
        raise NotImplementedError

    def _fork(self, at: tuple[int, int] | None) -> Session:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    def _check_cluster(self) -> None:
        """InvalidInput once the cluster (or the connection) is closed."""

    # ---- the boundary -------------------------------------------------------------------------------

    def _chat(self, turn: object, options: Mapping[str, Any]) -> CheckedTurn:
        new = turn_messages(turn)
        opts = validated(StepOptions, "step options", options)
        self._check_open()
        return CheckedTurn(new, None, opts)

    def _tokens(self, token_ids: Sequence[int], options: Mapping[str, Any]) -> CheckedTurn:
        ids = validated(TokenTurn, "step_tokens", {"token_ids": token_ids}).token_ids
        opts = validated(StepOptions, "step options", options)
        self._check_open()
        return CheckedTurn(None, ids, opts)

    def _either(
        self, turn: object, token_ids: Sequence[int] | None, options: Mapping[str, Any]
    ) -> CheckedTurn:
        if (turn is None) == (token_ids is None):
            raise InvalidInput("give a chat turn or token_ids, exactly one of them")
        return self._chat(turn, options) if token_ids is None else self._tokens(token_ids, options)

    def _mark(self, at: int | None) -> tuple[int, int] | None:
        if at is None:
            return None
        marks = self._manifest.marks
        if isinstance(at, bool) or not isinstance(at, int) or not 0 <= at < len(marks):
            raise InvalidInput(f"at must index the session's marks, [0, {len(marks)}), not {at!r}")
        return marks[at]

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidInput(f"session {self.id} is closed")
        self._check_cluster()


class LocalSession(Session):
    """A session of an embedded cluster: both faces drive the step flow over its Backend."""

    def __init__(self, backend: Backend, manifest: SessionManifest) -> None:
        super().__init__(manifest)
        self._backend = backend
        self._busy = threading.Lock()

    def _run(self, turn: CheckedTurn) -> Iterator[StepChunk | StepResult]:
        backend, handle = self._backend, None
        with self._stepping() as lease:
            flow: Flow = step_flow(backend.facts, self._manifest, self._prepare(turn))
            reply: Any = None
            try:
                while True:
                    try:
                        effect = flow.send(reply)
                    except StopIteration as done:
                        yield done.value
                        return
                    reply = None
                    if isinstance(effect, Lookup):
                        reply = backend.cached_prefix(effect.tenant, effect.prompt, effect.history)
                    elif isinstance(effect, Submit):
                        handle = backend.submit(effect.request)
                    elif isinstance(effect, Receive):
                        assert handle is not None
                        reply = handle.receive()
                    elif isinstance(effect, Emit):
                        yield effect.chunk
                    elif isinstance(effect, Stop):
                        assert handle is not None
                        handle.stop()
                    elif isinstance(effect, Commit):
                        reply = self._commit(lease, effect)
            finally:
                if handle is not None:
                    handle.cancel()

    async def _arun(self, turn: CheckedTurn) -> AsyncGenerator[StepChunk | StepResult, None]:
        backend, handle = self._backend, None
        with self._stepping() as lease:
            flow: Flow = step_flow(backend.facts, self._manifest, self._prepare(turn))
            reply: Any = None
            try:
                while True:
                    try:
                        effect = flow.send(reply)
                    except StopIteration as done:
                        yield done.value
                        return
                    reply = None
                    if isinstance(effect, Lookup):
                        lookup = partial(backend.cached_prefix, effect.tenant, effect.prompt, effect.history)
                        reply = await anyio.to_thread.run_sync(lookup)
                    elif isinstance(effect, Submit):
                        handle = backend.submit(effect.request)
                    elif isinstance(effect, Receive):
                        assert handle is not None
                        reply = await handle.areceive()
                    elif isinstance(effect, Emit):
                        yield effect.chunk
                    elif isinstance(effect, Stop):
                        assert handle is not None
                        handle.stop()
                    elif isinstance(effect, Commit):
                        reply = await anyio.to_thread.run_sync(self._commit, lease, effect)
            finally:
                if handle is not None:
                    handle.cancel()

    def _fork(self, at: tuple[int, int] | None) -> Session:
        return LocalSession(self._backend, self._backend.fork(self._manifest, at))

    def _close(self) -> None:
        self._backend.unpin(self.id)

    def _check_cluster(self) -> None:
        self._backend.check_open()

    def _prepare(self, turn: CheckedTurn) -> PreparedStep:
        return prepare(self._backend.facts, self._manifest, turn.token_ids, turn.messages, turn.options)

    @contextmanager
    def _stepping(self) -> Iterator[Lease]:
        """This handle's lock and the session's lease (across handles and processes) for one step."""
        self._check_open()
        if not self._busy.acquire(blocking=False):
            raise SessionBusy(f"session {self.id} is already running a step")
        try:
            with self._backend.lease(self.id) as lease:
                lease.check(self._manifest)  # SessionBusy if another handle advanced it
                yield lease
        finally:
            self._busy.release()

    def _commit(self, lease: Lease, commit: Commit) -> SessionManifest:
        self._manifest = lease.save(commit.manifest)
        self._backend.pin(self.id, commit.keys, self._manifest.ttl_s)
        return self._manifest


def _last(items: Iterator[StepChunk | StepResult]) -> StepResult:
    """Run a step to its end: its last item is the result."""
    *_, result = items
    assert isinstance(result, StepResult)
    return result


async def _alast(items: AsyncGenerator[StepChunk | StepResult, None]) -> StepResult:
    result = None
    async for result in items:  # noqa: B007 - the last item is the result
        pass
    assert isinstance(result, StepResult)
    return result
