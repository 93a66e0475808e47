"""What the scheduler sees (engine reports, requests) and what it answers (placements).

Tokens are the paper's single proxy for GPU, disk and network load, so every quantity here is a token count.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Literal, NamedTuple

from dualpath_sdk.config import ReadPlanChoice

Role = Literal["pe", "de"]
"""An engine's role: prefill (PE) or decode (DE)."""


class EngineReport(NamedTuple):
    """One engine's load as its group leader reports it.

    `read_q` is the storage read queue (tokens) of the engine's node: engines on one node share one SNIC.
    `free_tokens` is the KV memory the engine can still hand out (decode engines reserve it per request).
    A NamedTuple, as the pipeline's records are: a pass is handed many, and they cost what a tuple costs.
    """

    engine_id: Hashable
    node_id: Hashable
    role: Role
    seq_e: int
    tok_e: int
    read_q: int
    free_tokens: int


@dataclass(frozen=True, slots=True)
class Request:
    """A request as the scheduler needs it: len(r) = `tokens`, of which `cached_tokens` are in storage.

    `decode_tokens` is the generation budget a decode engine must reserve memory for on top of the prompt;
    `read_plan` is the side the step asks to read on ("auto": the scheduler's choice).
    """

    request_id: Hashable
    tokens: int
    cached_tokens: int = 0
    decode_tokens: int = 0
    read_plan: ReadPlanChoice = "auto"

    @property
    def new_tokens(self) -> int:
        return self.tokens - self.cached_tokens

    @property
    def de_memory_tokens(self) -> int:
        return self.tokens + self.decode_tokens


class Placement(NamedTuple):
    """The decision "request goes to engine"."""

    request: Request
    engine_id: Hashable


@dataclass(frozen=True, slots=True)
class Thresholds:
    """alpha: read-queue tokens one SNIC drains in alpha_s; beta: tokens one PE prefills in beta_s."""

    alpha: float
    beta: float
