"""Session: one agent conversation whose KV-Cache outlives each turn. StepResult: what a turn returns."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dualpath_sdk.api.inputs import StepOptions, TokenTurn, turn_messages, validated
from dualpath_sdk.cluster.controller import PlanChoice, StepOutcome, StepRequest
from dualpath_sdk.engine.sequence import SamplingParams
from dualpath_sdk.errors import ContextTooLong, InvalidInput, SessionBusy
from dualpath_sdk.kv.keys import block_keys
from dualpath_sdk.model.chat import continuation_ids, encode_chat
from dualpath_sdk.store.manifest import Lease, SessionManifest

if TYPE_CHECKING:
    from dualpath_sdk.api.cluster import Cluster

Message = Mapping[str, Any]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose KV was loaded, not computed
    completion_tokens: int


@dataclass(frozen=True)
class Load:
    plan: str  # "none" | "pe" | "de" | "split"
    bytes_pe: int  # KV read from storage through the PE node
    bytes_de: int  # ... and through the DE node


@dataclass(frozen=True)
class Persist:
    blocks: int  # Full Blocks of this step written to the store
    failed: int  # ... that failed to persist (counted and logged; the next turn recomputes them)


@dataclass(frozen=True)
class Timings:
    queue_s: float
    read_s: float
    prefill_s: float
    ttft_s: float
    decode_s: float
    tpot_s: float


@dataclass(frozen=True)
class StepResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    load: Load
    persist: Persist
    timings: Timings


@dataclass(frozen=True)
class StepChunk:
    text: str
    token_ids: list[int]


class Session:
    """Steps run one at a time, across handles and processes (SessionBusy otherwise); a failed step
    leaves the session as it was. After `close()` (or the cluster's) steps raise InvalidInput."""

    def __init__(self, cluster: Cluster, manifest: SessionManifest) -> None:
        self._cluster = cluster
        self._manifest = manifest
        self._busy = threading.Lock()
        self._closed = False

    @property
    def id(self) -> str:
        return self._manifest.session_id

    @property
    def token_ids(self) -> list[int]:
        return list(self._manifest.token_ids)

    @property
    def messages(self) -> list[dict[str, Any]]:
        return [dict(m) for m in self._manifest.messages]

    # ---- steps ------------------------------------------------------------------------------

    def step(self, turn: str | Message | Sequence[Message], **options: Any) -> StepResult:
        """One turn: a user string, a message, or a list of messages (tool results, ...).

        Keywords: max_tokens, temperature, top_p, seed, stop_token_ids, ignore_eos, read_plan.
        """
        return _last(self._chat(turn, options))

    def step_tokens(self, token_ids: Sequence[int], **options: Any) -> StepResult:
        """One turn given as raw token ids appended to the session's tokens (no chat template)."""
        ids = validated(TokenTurn, "step_tokens", {"token_ids": token_ids}).token_ids
        return _last(self._run(ids, None, validated(StepOptions, "step options", options)))

    def stream(self, turn: str | Message | Sequence[Message], **options: Any) -> Iterator[StepChunk]:
        """Like step, yielding text as it is generated."""
        for item in self._chat(turn, options):
            if isinstance(item, StepChunk):
                yield item

    def fork(self) -> Session:
        """A new session that shares every cached block of this one."""
        self._check_open()
        return Session(self._cluster, self._cluster.manifests.fork(self.id, blocks=self._cluster.store))

    def close(self) -> None:
        """Drop the session's pin on its blocks (they become evictable); the manifest stays, so the
        session can be resumed. This handle refuses further steps."""
        if not self._closed:
            self._closed = True
            self._cluster.store.unpin(self.id)

    # ---- internals ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidInput(f"session {self.id} is closed")
        self._cluster.check_open()

    def _chat(self, turn: object, options: Mapping[str, Any]) -> Iterator[StepChunk | StepResult]:
        """Validate a chat turn and its options, render only its new tokens, and run the step."""
        new = turn_messages(turn)
        opts = validated(StepOptions, "step options", options)
        self._check_open()
        return self._run(self._chat_ids(new), new, opts)

    def _chat_ids(self, new: list[dict[str, Any]]) -> list[int]:
        tokenizer = self._cluster.tokenizer
        if tokenizer is None:
            raise InvalidInput("the model has no tokenizer: use step_tokens")
        history = self._manifest.messages
        if not self._manifest.token_ids:
            return encode_chat(tokenizer, [*history, *new])
        if not history or history[-1].get("role") != "assistant":
            raise InvalidInput("this session was stepped with raw token ids: continue it with step_tokens")
        ended_with_stop = self._manifest.token_ids[-1] == tokenizer.eos_token_id
        return continuation_ids(tokenizer, history, new, ended_with_stop)

    def _run(
        self, new_ids: list[int], new_messages: list[dict[str, Any]] | None, options: StepOptions
    ) -> Iterator[StepChunk | StepResult]:
        """Check the step against the model and the cluster, then return its (lazy) run.

        `options.read_plan` forces this step's read side ("pe", "de", "split"); by default the
        cluster's."""
        self._check_open()
        params = options.sampling()
        cluster = self._cluster
        prompt = [*self._manifest.token_ids, *new_ids]
        vocab = cluster.vocab_size
        if max(new_ids) >= vocab or any(t >= vocab for t in params.stop_token_ids or ()):
            raise InvalidInput(f"token ids must be in [0, {vocab})")
        if len(prompt) + params.max_tokens > cluster.max_context:
            raise ContextTooLong(
                f"{len(prompt)} prompt tokens + max_tokens {params.max_tokens} "
                f"exceed the context of {cluster.max_context}"
            )
        plan = options.read_plan or cluster.config.read_plan
        if cluster.config.mode == "basic" and plan in ("de", "split"):
            raise InvalidInput("a basic-mode cluster reads on the PE side only")
        return self._steps(prompt, new_messages, params, plan)

    def _steps(
        self,
        prompt: list[int],
        new_messages: list[dict[str, Any]] | None,
        params: SamplingParams,
        plan: PlanChoice,
    ) -> Iterator[StepChunk | StepResult]:
        """One step under this handle's lock and the session's lease (across handles and processes)."""
        if not self._busy.acquire(blocking=False):
            raise SessionBusy(f"session {self.id} is already running a step")
        try:
            with self._cluster.manifests.lease(self.id) as lease:
                lease.check(self._manifest)  # SessionBusy if another handle advanced it
                yield from self._step(lease, prompt, new_messages, params, plan)
        finally:
            self._busy.release()

    def _step(
        self,
        lease: Lease,
        prompt: list[int],
        new_messages: list[dict[str, Any]] | None,
        params: SamplingParams,
        plan: PlanChoice,
    ) -> Iterator[StepChunk | StepResult]:
        cluster = self._cluster
        bs = cluster.block_size
        root = cluster.root_key(self._manifest.tenant)
        keys = block_keys(root, prompt[: (len(prompt) - 1) // bs * bs], bs)
        if cluster.config.mode == "oracle":  # nothing is stored: count the history as cached
            cached = min(len(keys), len(self._manifest.token_ids) // bs)
        else:
            cached = cluster.store.longest_prefix(keys)
        request = StepRequest(prompt, params, self._manifest.tenant, keys[:cached], plan)
        generated: list[int] = []
        outcome: StepOutcome | None = None
        for event in cluster.run(request):
            if isinstance(event, StepOutcome):
                outcome = event
            else:
                generated += event
                yield StepChunk(cluster.decode(event), event)
        assert outcome is not None
        text = cluster.decode(generated)
        messages = list(self._manifest.messages)
        if new_messages is not None:
            messages += [*new_messages, {"role": "assistant", "content": text}]
        tokens = [*prompt, *generated]
        all_keys = block_keys(root, tokens, bs)
        self._manifest = lease.save(
            self._manifest.model_copy(
                update={"token_ids": tokens, "messages": messages, "block_keys": [k.hex() for k in all_keys]}
            )
        )
        cluster.pin(self.id, all_keys, self._manifest.ttl_s)
        yield _result(text, generated, prompt, outcome)


def _last(items: Iterator[StepChunk | StepResult]) -> StepResult:
    """Run a step to its end: its last item is the result."""
    *_, result = items
    assert isinstance(result, StepResult)
    return result


def _result(text: str, generated: list[int], prompt: list[int], o: StepOutcome) -> StepResult:
    tpot = o.decode_s / max(len(generated) - 1, 1)
    return StepResult(
        text=text,
        token_ids=generated,
        finish_reason=o.finish_reason,
        usage=Usage(len(prompt), o.num_cached, len(generated)),
        load=Load(o.plan, o.bytes_pe, o.bytes_de),
        persist=Persist(o.persisted, o.persist_failed),
        timings=Timings(o.queue_s, o.read_s, o.prefill_s, o.ttft_s, o.decode_s, tpot),
    )
