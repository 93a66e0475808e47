"""Agent trajectories shaped like the paper's workload table (PAPER.md, Evaluation setup).

The table's turn counts are about twice what its token counts allow (157 x (429 + 176) = 95K > 64K), so we
read "turns" as messages (assistant + tool) and replay turns/2 LLM calls per trajectory. The first prompt
p0 then follows from the table: total = p0 + calls x (append + gen), which also reproduces the average
context (64K: p0 = 9,484, avg context ~32.7K) and the ~98.7% cached share.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class WorkloadShape:
    max_len: str
    turns: int
    append: int
    gen: int
    total: int
    context: int

    @property
    def calls(self) -> int:
        return round(self.turns / 2)

    @property
    def first_prompt(self) -> int:
        return self.total - self.calls * (self.append + self.gen)


SHAPES: dict[str, WorkloadShape] = {
    "32K": WorkloadShape("32K", 60, 608, 148, 28_639, 17_183),
    "48K": WorkloadShape("48K", 106, 474, 172, 42_607, 25_120),
    "64K": WorkloadShape("64K", 157, 429, 176, 55_958, 32_721),
}


def shape(name: str, append: int | None = None, gen: int | None = None) -> WorkloadShape:
    """The table's workload `name`, with other mean append and generation lengths per call when given
    (a sweep): same calls and first prompt, so the totals grow with them."""
    base = SHAPES[name]
    if append is None and gen is None:
        return base
    a, g = append or base.append, gen or base.gen
    total = base.first_prompt + base.calls * (a + g)
    context = base.context + (total - base.total) // 2
    return WorkloadShape(base.max_len, base.turns, a, g, total, context)


@dataclass(slots=True)
class Trajectories:
    """Per agent: first prompt, and per call the appended and generated token counts."""

    first_prompt: np.ndarray  # [agents]
    append: np.ndarray  # [agents, calls]
    gen: np.ndarray  # [agents, calls]

    @property
    def agents(self) -> int:
        return int(self.first_prompt.shape[0])


def generate(shape: WorkloadShape, agents: int, seed: int) -> Trajectories:
    """Geometric appended/generated lengths around the table's means; p0 uniform in [0.5, 1.5] x."""
    rng = np.random.default_rng(seed)
    calls = shape.calls
    append = rng.geometric(1 / shape.append, size=(agents, calls)).astype(np.int64)
    gen = rng.geometric(1 / shape.gen, size=(agents, calls)).astype(np.int64)
    p0 = (shape.first_prompt * rng.uniform(0.5, 1.5, size=agents)).astype(np.int64)
    return Trajectories(p0, append, gen)
