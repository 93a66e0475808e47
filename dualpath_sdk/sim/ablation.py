"""The paper's ablation: Basic, then layer-wise prefill, then the dual path, then the scheduler.

Each step turns on one more of DualPath's parts over Basic. Until the scheduler is on, PEs and DEs are
chosen round robin (Basic's choices) and, once the dual path is on, reads go to the side with the shorter
read queue (the paper's read rule; split reads when the run's SchedulerConfig asks for them). The last
step is DualPath itself. Every decision is still made by `scheduler.Scheduler`: a step only says which
mode's answer each question gets.
"""

from __future__ import annotations

from dataclasses import dataclass

from dualpath_sdk.config import ReadPlanChoice, SchedulerConfig
from dualpath_sdk.scheduler import AttentionModel, ReadPlan, Scheduler, Thresholds


@dataclass(frozen=True, slots=True)
class Features:
    """Which of DualPath's parts a run has (Basic has none, DualPath all three)."""

    layerwise: bool  # layer-wise prefill: loads, compute and sends overlap
    dual_path: bool  # the DE read path: reads may go to the DE node's SNIC
    scheduler: bool  # the paper's PE and DE choice instead of round robin


STEPS: dict[str, Features] = {
    "basic": Features(layerwise=False, dual_path=False, scheduler=False),
    "+layerwise": Features(layerwise=True, dual_path=False, scheduler=False),
    "+dual path": Features(layerwise=True, dual_path=True, scheduler=False),
    "+scheduler": Features(layerwise=True, dual_path=True, scheduler=True),
}


class AblationScheduler(Scheduler):
    """A Scheduler whose PE/DE choices are DualPath's or Basic's, and whose read side and prefill style
    follow the features on their own."""

    def __init__(
        self, config: SchedulerConfig, thresholds: Thresholds, attention: AttentionModel, features: Features
    ) -> None:
        super().__init__(config, thresholds, attention, "dualpath" if features.scheduler else "basic")
        self.features = features
        self._reads = Scheduler(config, thresholds, attention, "dualpath" if features.dual_path else "basic")

    @property
    def layerwise(self) -> bool:
        return self.features.layerwise

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
        return self._reads.plan_read(
            cached_blocks, block_tokens, pe_read_q, de_read_q, pe_rate, de_rate, cached_tokens, choice
        )
