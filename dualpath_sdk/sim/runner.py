"""Experiments: offline JCT, online TTFT/TPOT at a rate, and capacity under the SLO (PAPER.md)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from dualpath_sdk.config import Mode, SchedulerConfig
from dualpath_sdk.sim.cluster import PAPER_SETUP, Options, Simulation
from dualpath_sdk.sim.metrics import summary
from dualpath_sdk.sim.presets import Preset
from dualpath_sdk.sim.workload import generate, shape

TTFT_SLO_S = 4.0
TPOT_SLO_S = 0.050


def offline(
    preset: Preset,
    mode: Mode,
    agents: int,
    seed: int = 0,
    config: SchedulerConfig | None = None,
    options: Options = PAPER_SETUP,
    label: str | None = None,
) -> dict[str, Any]:
    """N agents start together; JCT = when the last one finishes its trajectory. `label` names the run in
    place of the mode (an ablation step)."""
    traj = generate(shape(preset.workload, preset.append, preset.gen), agents, seed)
    sim = Simulation(preset, mode, traj, np.zeros(agents), config, options=options)
    t0 = time.perf_counter()
    m = sim.run()
    wall = time.perf_counter() - t0
    out: dict[str, Any] = {
        "preset": preset.name,
        "mode": label or mode,
        "agents": agents,
        "jct_s": round(m.last_done, 2),
    }
    out.update(summary(sim, wall, m.last_done, np.ones(len(m.ttft), dtype=bool)))
    return out


def online(
    preset: Preset,
    mode: Mode,
    rate: float,
    horizon_s: float,
    seed: int = 0,
    config: SchedulerConfig | None = None,
    options: Options = PAPER_SETUP,
) -> dict[str, Any]:
    """Agents arrive as a Poisson process for `horizon_s`; the first third is warm-up, not measured.

    Agents make no new call after the horizon so the run drains; calls arriving inside the window count.
    """
    rng = np.random.default_rng(seed + 1)
    starts = np.cumsum(rng.exponential(1 / rate, size=int(rate * horizon_s * 1.5) + 10))
    starts = starts[starts < horizon_s]
    traj = generate(shape(preset.workload, preset.append, preset.gen), len(starts), seed)
    sim = Simulation(preset, mode, traj, starts, config, stop_calls_at=horizon_s, options=options)
    t0 = time.perf_counter()
    m = sim.run()
    wall = time.perf_counter() - t0
    arrival = np.frombuffer(m.arrival)
    window = (arrival >= horizon_s / 3) & (arrival < horizon_s)
    out: dict[str, Any] = {"preset": preset.name, "mode": mode, "rate": rate}
    out.update(summary(sim, wall, horizon_s, window))
    out["within_slo"] = bool(
        out["ttft_s"] is not None and out["ttft_s"] <= TTFT_SLO_S and out["tpot_ms"] <= TPOT_SLO_S * 1e3
    )
    return out


def capacity(
    preset: Preset,
    mode: Mode,
    lo: float,
    hi: float,
    horizon_s: float,
    steps: int = 6,
    seed: int = 0,
    config: SchedulerConfig | None = None,
    options: Options = PAPER_SETUP,
) -> dict[str, Any]:
    """Bisect the highest agent arrival rate (agents/s) within TTFT <= 4 s and TPOT <= 50 ms (means).

    `capacity` is the highest rate that met the SLO, `fails_at` the lowest that did not (the bracket).
    """
    runs = []
    for _ in range(steps):
        mid = (lo + hi) / 2
        res = online(preset, mode, mid, horizon_s, seed, config, options)
        runs.append(res)
        lo, hi = (mid, hi) if res["within_slo"] else (lo, mid)
    return {
        "preset": preset.name,
        "mode": mode,
        "capacity": round(lo, 4),
        "fails_at": round(hi, 4),
        "runs": runs,
    }
