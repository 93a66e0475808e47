"""Session: one agent conversation whose KV-Cache outlives each turn, with a sync and an async face.

Both faces drive the same I/O-free step flow (api/flow.py): `step` / `stream` perform its effects
with blocking calls, `astep` / `astream` with awaits (anyio: any asyncio or trio program), moving
every blocking call off the event loop. Leaving a step early (an error, a `break` out of a stream,
a cancelled task, a timeout) cancels it on the engines and leaves the session as it was.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import contextmanager
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


class Session:
    """Steps run one at a time, across handles and processes (SessionBusy otherwise); a failed step
    leaves the session as it was. After `close()` (or the cluster's) steps raise InvalidInput."""

    def __init__(self, backend: Backend, manifest: SessionManifest) -> None:
        self._backend = backend
        self._manifest = manifest
        self._busy = threading.Lock()
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

    # ---- the sync face ------------------------------------------------------------------------

    def step(self, turn: Turn, **options: Any) -> StepResult:
        """One turn: a user string, a message, or a list of messages (tool results, ...).

        Keywords: max_tokens, temperature, top_p, seed, stop_token_ids, ignore_eos, read_plan,
        stop (strings that end the reply), tools (OpenAI function schemas: `r.tool_calls`).
        """
        return _last(self._drive(self._chat(turn, options)))

    def step_tokens(self, token_ids: Sequence[int], **options: Any) -> StepResult:
        """One turn given as raw token ids appended to the session's tokens (no chat template)."""
        return _last(self._drive(self._tokens(token_ids, options)))

    def stream(self, turn: Turn, **options: Any) -> Iterator[StepChunk]:
        """Like step, yielding text as it is generated."""
        for item in self._drive(self._chat(turn, options)):
            if isinstance(item, StepChunk):
                yield item

    def fork(self) -> Session:
        """A new session that shares every cached block of this one."""
        self._check_open()
        return Session(self._backend, self._backend.fork(self._manifest))

    def close(self) -> None:
        """Drop the session's pin on its blocks (they become evictable); the manifest stays, so the
        session can be resumed. This handle refuses further steps."""
        if not self._closed:
            self._closed = True
            self._backend.unpin(self.id)

    # ---- the async face -----------------------------------------------------------------------

    async def astep(self, turn: Turn, **options: Any) -> StepResult:
        """`step` without blocking the event loop."""
        return await _alast(self._adrive(self._chat(turn, options)))

    async def astep_tokens(self, token_ids: Sequence[int], **options: Any) -> StepResult:
        return await _alast(self._adrive(self._tokens(token_ids, options)))

    async def astream(self, turn: Turn, **options: Any) -> AsyncIterator[StepChunk]:
        async for item in self._adrive(self._chat(turn, options)):
            if isinstance(item, StepChunk):
                yield item

    async def afork(self) -> Session:
        return await anyio.to_thread.run_sync(self.fork)

    async def aclose(self) -> None:
        await anyio.to_thread.run_sync(self.close)

    # ---- the drivers ----------------------------------------------------------------------------

    def _drive(self, step: PreparedStep) -> Iterator[StepChunk | StepResult]:
        backend, handle = self._backend, None
        with self._stepping() as lease:
            flow: Flow = step_flow(backend.facts, self._manifest, step)
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

    async def _adrive(self, step: PreparedStep) -> AsyncIterator[StepChunk | StepResult]:
        backend, handle = self._backend, None
        with self._stepping() as lease:
            flow: Flow = step_flow(backend.facts, self._manifest, step)
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

    # ---- internals ----------------------------------------------------------------------------

    def _chat(self, turn: object, options: Mapping[str, Any]) -> PreparedStep:
        new = turn_messages(turn)
        opts = validated(StepOptions, "step options", options)
        self._check_open()
        return prepare(self._backend.facts, self._manifest, None, new, opts)

    def _tokens(self, token_ids: Sequence[int], options: Mapping[str, Any]) -> PreparedStep:
        ids = validated(TokenTurn, "step_tokens", {"token_ids": token_ids}).token_ids
        opts = validated(StepOptions, "step options", options)
        self._check_open()
        return prepare(self._backend.facts, self._manifest, ids, None, opts)

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidInput(f"session {self.id} is closed")
        self._backend.check_open()

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


async def _alast(items: AsyncIterator[StepChunk | StepResult]) -> StepResult:
    result = None
    async for result in items:  # noqa: B007 - the last item is the result
        pass
    assert isinstance(result, StepResult)
    return result
