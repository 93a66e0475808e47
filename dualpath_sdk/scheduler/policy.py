"""One object that answers every scheduling question for a mode, so cluster and sim cannot disagree."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from dualpath_sdk.config import Mode, ReadPlanChoice, SchedulerConfig
from dualpath_sdk.scheduler.batching import AttentionModel, Chunk, PrefillWork, pack_quota
from dualpath_sdk.scheduler.de_choice import G, choose_de, choose_de_group
from dualpath_sdk.scheduler.pe_choice import choose_pe
from dualpath_sdk.scheduler.read_plan import ReadPlan, de_only, pe_only, shorter_queue, split_read
from dualpath_sdk.scheduler.reports import EngineReport, Placement, Request, Thresholds


class Scheduler:
    """The decisions of one mode.

    - "dualpath": the paper's PE and DE choice; reads on the shorter-queue side, or split between both
      sides when `config.split_reads`; layer-wise prefill.
    - "basic": the paper's baseline: round-robin PE and DE choice (still skipping engines over beta or
      without memory), PE-side reads only, no layer-wise prefill.
    - "oracle": dualpath's PE and DE choice; the executor skips all reads and KV transfers (`skips_io`),
      so its read plan is basic's: the PE side is told every block, and reads none.
    The only state is the round-robin cursors of "basic".
    """

    def __init__(
        self,
        config: SchedulerConfig,
        thresholds: Thresholds,
        attention: AttentionModel,
        mode: Mode = "dualpath",
    ) -> None:
        self.config = config
        self.thresholds = thresholds
        self.attention = attention
        self.mode: Mode = mode
        self._pe_cursor = 0
        self._de_cursor = 0
        self._group_cursor = 0

    @property
    def layerwise(self) -> bool:
        return self.mode != "basic"

    @property
    def skips_io(self) -> bool:
        return self.mode == "oracle"

    def choose_pe(self, queue: Iterable[Request], engines: Sequence[EngineReport]) -> list[Placement]:
        if self.mode != "basic":
            return choose_pe(queue, engines, self.thresholds)
        beta = self.thresholds.beta
        tok = [e.tok_e for e in engines]
        placements: list[Placement] = []
        for request in queue:
            i = self._next_round_robin(self._pe_cursor, [t <= beta for t in tok])
            if i is None:
                break
            self._pe_cursor = i + 1
            tok[i] += request.tokens
            placements.append(Placement(request, engines[i].engine_id))
        return placements

    def choose_de_group(
        self, queue: Iterable[Request], group_tok: Mapping[G, int]
    ) -> list[tuple[Request, G]]:
        if self.mode != "basic":
            return choose_de_group(queue, group_tok)
        groups = list(group_tok)
        out: list[tuple[Request, G]] = []
        for request in queue:
            out.append((request, groups[self._group_cursor % len(groups)]))
            self._group_cursor += 1
        return out

    def choose_de(self, queue: Sequence[Request], engines: Sequence[EngineReport]) -> list[Placement]:
        if self.mode != "basic":
            return choose_de(queue, engines, self.config.de_slack)
        free = [e.free_tokens for e in engines]
        placements: list[Placement] = []
        for request in queue:
            need = request.de_memory_tokens
            i = self._next_round_robin(self._de_cursor, [f >= need for f in free])
            if i is None:
                break
            self._de_cursor = i + 1
            free[i] -= need
            placements.append(Placement(request, engines[i].engine_id))
        return placements

    def plan_read(
        self,
        cached_blocks: int,
        block_tokens: int,
        pe_read_q: float,
        de_read_q: float,
        pe_rate: float,
        de_rate: float,
        cached_tokens: int | None = None,
        choice: ReadPlanChoice = "auto",
    ) -> ReadPlan:
        """Read side for one request whose PE and DE are chosen; queues in tokens, rates in tokens/s.
        `cached_tokens`: what the blocks hold when the last one is partial (default: whole blocks).
        `choice` is the step's: "auto" leaves it to the mode; "pe" and "de" force one side; "split"
        forces both (halves when the queues would give one side everything) in dualpath."""
        if self.mode != "dualpath" or choice == "pe":
            return pe_only(cached_blocks)
        if choice == "de":
            return de_only(cached_blocks)
        args = (cached_blocks, block_tokens, pe_read_q, de_read_q, pe_rate, de_rate, cached_tokens)
        if choice == "split":
            plan = split_read(*args)
            if plan.kind != "split" and cached_blocks >= 2:
                half = cached_blocks // 2
                plan = ReadPlan("split", half, cached_blocks - half)
            return plan
        if self.config.split_reads:
            return split_read(*args)
        return shorter_queue(cached_blocks, pe_read_q, de_read_q)

    def batch_prefill(self, queue: Iterable[PrefillWork]) -> list[Chunk]:
        return pack_quota(queue, self.attention, self.config.compute_quota_s)

    @staticmethod
    def _next_round_robin(cursor: int, eligible: Sequence[bool]) -> int | None:
        for k in range(len(eligible)):
            i = (cursor + k) % len(eligible)
            if eligible[i]:
                return i
        return None
