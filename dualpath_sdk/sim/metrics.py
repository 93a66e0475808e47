"""What a run measured: per-call latencies and read plans as they happen, then the summary runner.py
reports (means, percentiles, SNIC and link use)."""

from __future__ import annotations

from array import array
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from dualpath_sdk.sim.cluster import Simulation


@dataclass
class Metrics:
    arrival: array = field(default_factory=lambda: array("d"))
    ttft: array = field(default_factory=lambda: array("d"))
    tpot: array = field(default_factory=lambda: array("d"))
    read: array = field(default_factory=lambda: array("d"))  # KV read time of each call (s)
    plans: dict[str, int] = field(default_factory=lambda: {"none": 0, "pe": 0, "de": 0, "split": 0})
    read_tokens_pe: int = 0
    read_tokens_de: int = 0
    persisted_bytes: float = 0.0
    agents_done: int = 0
    last_done: float = 0.0


def link_utilisation(sim: Simulation, span: float) -> dict[str, float]:
    """Busiest link of each kind (role.link), as carried bytes over capacity x span."""
    util: dict[str, float] = defaultdict(float)

    def note(key: str, carried: float, cap: float) -> None:
        util[key] = max(util[key], carried / (cap * span))

    for node in sim.nodes:
        note(f"{node.role}.snic", sum(node.snic.carried), node.snic.capacity)
        note(f"{node.role}.dram", sum(node.dram.carried), node.dram.capacity)
    for role, engines in (("pe", sim.pes), ("de", sim.des)):
        for e in engines:
            note(f"{role}.cnic_in", sum(e.cnic_in.carried), e.cnic_in.capacity)
            note(f"{role}.cnic_out", sum(e.cnic_out.carried), e.cnic_out.capacity)
    return {k: round(v, 3) for k, v in sorted(util.items())}


def summary(sim: Simulation, wall: float, span: float, window: np.ndarray) -> dict[str, Any]:
    """The run's figures over the calls in `window` (a mask over calls in finishing order)."""
    m = sim.metrics
    ttft = np.frombuffer(m.ttft)[window]
    tpot = np.frombuffer(m.tpot)[window]
    read_s = np.frombuffer(m.read)[window]
    read = m.read_tokens_pe + m.read_tokens_de
    pe_snic = [sum(n.snic.carried) for n in sim.nodes if n.role == "pe"]
    de_snic = [sum(n.snic.carried) for n in sim.nodes if n.role == "de"]
    cap = sim.nodes[0].snic.capacity * span
    return {
        "requests": len(m.ttft),
        "agents_done": m.agents_done,
        "span_s": round(span, 2),
        "ttft_s": round(float(ttft.mean()), 3) if ttft.size else None,
        "tpot_ms": round(float(tpot.mean()) * 1e3, 2) if tpot.size else None,
        "ttft_p90_s": round(float(np.percentile(ttft, 90)), 3) if ttft.size else None,
        "tpot_p90_ms": round(float(np.percentile(tpot, 90)) * 1e3, 2) if tpot.size else None,
        "read_s": round(float(read_s.mean()), 3) if read_s.size else None,
        "plans": dict(m.plans),
        "read_share_de": round(m.read_tokens_de / read, 3) if read else 0.0,
        "snic_util_pe": round(float(np.mean(pe_snic)) / cap, 3),
        "snic_util_de": round(float(np.mean(de_snic)) / cap, 3),
        "link_util_max": link_utilisation(sim, span),
        "events": sim.loop.events,
        "wall_s": round(wall, 2),
        "events_per_s": round(sim.loop.events / wall),
    }
