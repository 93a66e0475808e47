"""The narrow interface sessions talk to a cluster through (they never touch its attributes).

`Cluster.local` implements it over the embedded engines; every blocking call here is quick local
I/O or a wait the async face moves off the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from dualpath_sdk.api.flow import ModelFacts
from dualpath_sdk.cluster.controller import StepOutcome, StepRequest
from dualpath_sdk.kv.keys import BlockKey
from dualpath_sdk.store.manifest import Lease, SessionManifest

Event = list[int] | StepOutcome


class StepHandle(Protocol):
    """A step submitted to the cluster."""

    def receive(self) -> Event:
        """The next event, blocking; the step's error is raised (StepTimeout when it stalls)."""
        ...

    async def areceive(self) -> Event:
        """The next event, without blocking the event loop."""
        ...

    def stop(self) -> None:
        """End the step now as finished ("stop"): its next event is the outcome."""
        ...

    def cancel(self) -> None:
        """Drop the step on its engines (idempotent; a finished step is left as it is)."""
        ...


class Backend(Protocol):
    facts: ModelFacts

    def check_open(self) -> None:
        """InvalidInput once the cluster is closed."""
        ...

    def cached_prefix(self, tenant: str, prompt: list[int], history: int) -> tuple[list[BlockKey], int]:
        """The keys of `prompt`'s stored leading blocks and the tokens they hold."""
        ...

    def submit(self, request: StepRequest) -> StepHandle: ...

    def lease(self, session_id: str) -> Lease:
        """The session's lease for one step (SessionBusy if another handle holds it)."""
        ...

    def pin(self, session_id: str, keys: Sequence[BlockKey], ttl_s: float) -> None: ...

    def unpin(self, session_id: str) -> None: ...

    def fork(self, manifest: SessionManifest, at: tuple[int, int] | None = None) -> SessionManifest:
        """A new session's manifest that shares every block of `manifest`'s session (up to its
        mark `at`, when given)."""
        ...
