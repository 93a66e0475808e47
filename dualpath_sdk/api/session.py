"""Session: one agent conversation whose KV-Cache outlives each turn. StepResult: what a turn returns."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dualpath_sdk.cluster.controller import PlanChoice, StepOutcome, StepRequest
from dualpath_sdk.engine.sequence import SamplingParams
from dualpath_sdk.errors import ContextTooLong, InvalidInput, SessionBusy
from dualpath_sdk.kv.keys import block_keys
from dualpath_sdk.model.chat import continuation_ids, encode_chat
from dualpath_sdk.store.manifest import SessionManifest

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
    timings: Timings


@dataclass(frozen=True)
class StepChunk:
    text: str
    token_ids: list[int]


class Session:
    """Steps run one at a time (SessionBusy otherwise); a failed step leaves the session as it was."""

    def __init__(self, cluster: Cluster, manifest: SessionManifest) -> None:
        self._cluster = cluster
        self._manifest = manifest
        self._busy = threading.Lock()

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

    def step(self, turn: str | Message | Sequence[Message], **sampling: Any) -> StepResult:
        """One turn: a user string, a message, or a list of messages (tool results, ...).

        Keywords: max_tokens, temperature, top_p, seed, stop_token_ids, ignore_eos, read_plan.
        """
        chunks = list(self._run(self._chat_ids(turn), _messages(turn), **sampling))
        return chunks[-1]  # type: ignore[return-value]

    def step_tokens(self, token_ids: Sequence[int], **sampling: Any) -> StepResult:
        """One turn given as raw token ids appended to the session's tokens (no chat template)."""
        if not token_ids:
            raise InvalidInput("a step needs at least one new token")
        return list(self._run(list(token_ids), None, **sampling))[-1]  # type: ignore[return-value]

    def stream(self, turn: str | Message | Sequence[Message], **sampling: Any) -> Iterator[StepChunk]:
        """Like step, yielding text as it is generated."""
        for item in self._run(self._chat_ids(turn), _messages(turn), **sampling):
            if isinstance(item, StepChunk):
                yield item

    def fork(self) -> Session:
        """A new session that shares every cached block of this one."""
        return Session(self._cluster, self._cluster.manifests.fork(self.id, blocks=self._cluster.store))

    def close(self) -> None:
        """Drop the session's pin on its blocks (they become evictable); the manifest stays."""
        self._cluster.store.unpin(self.id)

    # ---- internals ----------------------------------------------------------------------------

    def _chat_ids(self, turn: str | Message | Sequence[Message]) -> list[int]:
        tokenizer = self._cluster.tokenizer
        if tokenizer is None:
            raise InvalidInput("the model has no tokenizer: use step_tokens")
        new = _messages(turn)
        history = self._manifest.messages
        if not self._manifest.token_ids:
            return encode_chat(tokenizer, [*history, *new])
        ended_with_stop = self._manifest.token_ids[-1] == tokenizer.eos_token_id
        return continuation_ids(tokenizer, history, new, ended_with_stop)

    def _run(
        self,
        new_ids: list[int],
        new_messages: list[dict[str, Any]] | None,
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        ignore_eos: bool = False,
        read_plan: PlanChoice | None = None,
    ) -> Iterator[StepChunk | StepResult]:
        """`read_plan` forces this step's read side ("pe", "de", "split"); by default the cluster's."""
        params = SamplingParams(
            max_tokens,
            temperature,
            top_p,
            seed,
            tuple(stop_token_ids) if stop_token_ids else None,
            ignore_eos,
        )
        cluster = self._cluster
        prompt = [*self._manifest.token_ids, *new_ids]
        vocab = cluster.vocab_size
        if min(new_ids) < 0 or max(new_ids) >= vocab:
            raise InvalidInput(f"token ids must be in [0, {vocab})")
        if len(prompt) + max_tokens > cluster.max_context:
            raise ContextTooLong(
                f"{len(prompt)} prompt tokens + max_tokens {max_tokens} "
                f"exceed the context of {cluster.max_context}"
            )
        plan = read_plan or cluster.config.read_plan
        if plan not in ("auto", "pe", "de", "split"):
            raise InvalidInput(f"read_plan must be auto, pe, de or split, not {plan!r}")
        if cluster.config.mode == "basic" and plan in ("de", "split"):
            raise InvalidInput("a basic-mode cluster reads on the PE side only")
        if not self._busy.acquire(blocking=False):
            raise SessionBusy(f"session {self.id} is already running a step")
        try:
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
            for kind, payload in cluster.run(request):
                if kind == "tokens":
                    assert isinstance(payload, list)
                    generated += payload
                    yield StepChunk(cluster.decode(payload), payload)
                else:
                    assert isinstance(payload, StepOutcome)
                    outcome = payload
            assert outcome is not None
            text = cluster.decode(generated)
            messages = list(self._manifest.messages)
            if new_messages is not None:
                messages += [*new_messages, {"role": "assistant", "content": text}]
            tokens = [*prompt, *generated]
            all_keys = block_keys(root, tokens, bs)
            self._manifest = cluster.manifests.save(
                self._manifest.model_copy(
                    update={
                        "token_ids": tokens,
                        "messages": messages,
                        "block_keys": [k.hex() for k in all_keys],
                    }
                )
            )
            cluster.store.pin(self.id, all_keys, self._manifest.ttl_s)
            yield _result(text, generated, prompt, outcome)
        finally:
            self._busy.release()


def _messages(turn: str | Message | Sequence[Message]) -> list[dict[str, Any]]:
    if isinstance(turn, str):
        return [{"role": "user", "content": turn}]
    if isinstance(turn, Mapping):
        return [dict(turn)]
    messages = [dict(m) for m in turn]
    if not messages or not all("role" in m for m in messages):
        raise InvalidInput("a turn is a string, a message with a role, or a non-empty list of them")
    return messages


def _result(text: str, generated: list[int], prompt: list[int], o: StepOutcome) -> StepResult:
    tpot = o.decode_s / max(len(generated) - 1, 1)
    return StepResult(
        text=text,
        token_ids=generated,
        finish_reason=o.finish_reason,
        usage=Usage(len(prompt), o.num_cached, len(generated)),
        load=Load(o.plan, o.bytes_pe, o.bytes_de),
        timings=Timings(o.queue_s, o.read_s, o.prefill_s, o.ttft_s, o.decode_s, tpot),
    )
