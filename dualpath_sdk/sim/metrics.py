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
    wait: array = field(default_factory=lambda: array("d"))  # in the global queue (scheduling wait)
    alloc: array = field(default_factory=lambda: array("d"))  # in its DE group's queue (allocation)
    handoff: array = field(default_factory=lambda: array("d"))  # first token -> decoding (DE buffer -> GPU)
    plans: dict[str, int] = field(default_factory=lambda: {"none": 0, "pe": 0, "de": 0, "split": 0})
    read_tokens_pe: int = 0
    read_tokens_de: int = 0
    persisted_bytes: float = 0.0
    agents_done: int = 0
    last_done: float = 0.0
    history_tokens: int = 0  # bounded storage: whole-block history the calls would find stored...
    hit_tokens: int = 0  # ...and what they found
    prompt_tokens: int = 0  # bounded storage: every call's len(r) (what prefill would be without a cache)
    ws_blocks: int = 0  # working set now: history blocks of agents that will call again
    ws_peak: int = 0
    ws_area: float = 0.0  # working set integrated over time (block-seconds)
    ws_since: float = 0.0

    def working_set(self, now: float, delta: int) -> None:
        self.ws_area += self.ws_blocks * (now - self.ws_since)
        self.ws_since = now
        self.ws_blocks += delta
        self.ws_peak = max(self.ws_peak, self.ws_blocks)


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
        **_ttft_parts(m, window, ttft, tpot),
        "plans": dict(m.plans),
        "read_share_de": round(m.read_tokens_de / read, 3) if read else 0.0,
        "snic_util_pe": round(float(np.mean(pe_snic)) / cap, 3),
        "snic_util_de": round(float(np.mean(de_snic)) / cap, 3),
        "link_util_max": link_utilisation(sim, span),
        **_extras(sim, span),
        "events": sim.loop.events,
        "wall_s": round(wall, 2),
        "events_per_s": round(sim.loop.events / wall),
    }


def _extras(sim: Simulation, span: float) -> dict[str, Any]:
    """The figures of what Options added: working set, bounded storage, load balance."""
    m, out = sim.metrics, dict[str, Any]()
    gb = sim.bt * sim.kv / 1e9  # one block
    if sim.options.working_set or sim.store:
        out["tool_latency_s"] = sim.options.tool_latency_s
        m.working_set(span, 0)  # integrate to the end
        out["ws_peak_gb"] = round(m.ws_peak * gb, 1)
        out["ws_mean_gb"] = round(m.ws_area / span * gb, 1) if span else 0.0
    if sim.store:
        out["storage_gb"] = round(sim.store.capacity * gb, 1)
        out["pin_ttl_s"] = sim.store.pin_ttl_s
        out["hit_rate"] = round(m.hit_tokens / m.history_tokens, 4) if m.history_tokens else None
        prefilled = m.prompt_tokens - m.hit_tokens
        out["recompute_share"] = (
            round((m.history_tokens - m.hit_tokens) / prefilled, 4) if prefilled else None
        )
        out["evicted_gb"] = round(sim.store.evicted * gb, 1)
        out["write_failed_gb"] = round(sim.store.failed * gb, 1)
    if sim.balance:
        out.update(sim.balance.summary())
    return out


def _ttft_parts(m: Metrics, window: np.ndarray, ttft: np.ndarray, tpot: np.ndarray) -> dict[str, Any]:
    """Mean TTFT in the paper's parts: scheduling wait (global queue), allocation (DE group queue, for DE
    memory), KV read, prefill (waiting for and running the PE's batches, sends included); they sum to
    TTFT. TTST, the time to the second token: the handoff into the DE GPU plus one decode step (TPOT)."""
    if not ttft.size:
        return {}
    parts = {k: np.frombuffer(getattr(m, k))[window] for k in ("wait", "alloc", "read")}
    prefill = ttft - parts["wait"] - parts["alloc"] - parts["read"]
    ttst = np.frombuffer(m.handoff)[window] + tpot
    return {
        "wait_s": round(float(parts["wait"].mean()), 3),
        "alloc_s": round(float(parts["alloc"].mean()), 3),
        "prefill_s": round(float(prefill.mean()), 3),
        "ttst_ms": round(float(ttst.mean()) * 1e3, 2),
    }
