"""Load balance over a run (the paper's load-balance figures), in windows of `interval` seconds.

- Storage NICs: per window, the bytes each node's SNIC served; max/avg over all nodes.
- Attention: per window and PE node, the attention time each of its engines (one data-parallel attention
  rank per GPU) computed; max/avg over the node's engines. Data-parallel ranks wait for the slowest before
  the MoE step, so max/avg is the time a synchronised step would take over the time its work needs. The
  simulator runs each engine's batches on their own, so the figure shows how evenly the PE choice and the
  compute-quota batches spread attention work, not stalls it simulated. A batch's attention counts in
  the window it starts in.

Windows in which nothing was read (or attended) are skipped. Observing moves no clock (Link.served_until).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from dualpath_sdk.sim.engines import PrefillEngine

if TYPE_CHECKING:
    from dualpath_sdk.sim.cluster import Simulation


class Balance:
    """Samples a Simulation every `interval` s of simulated time until its events run out."""

    def __init__(self, sim: Simulation, interval: float) -> None:
        self.sim = sim
        self.interval = interval
        self.attn = [0.0] * len(sim.pes)  # attention seconds per PE so far
        self._snic = [0.0] * len(sim.nodes)
        self._attn = [0.0] * len(sim.pes)
        self.snic_ratio: list[float] = []  # per window
        self.attn_ratio: list[float] = []  # per window and PE node

    def start(self) -> None:
        self.sim.loop.at(self.interval, self._sample)

    def attention(self, e: PrefillEngine, seconds: float) -> None:
        self.attn[e.idx] += seconds

    def _sample(self, _: object) -> None:
        loop, sim = self.sim.loop, self.sim
        snic = [n.snic.served_until(loop.now) for n in sim.nodes]
        served = [a - b for a, b in zip(snic, self._snic, strict=True)]
        self._snic = snic
        if sum(served) > 0:
            self.snic_ratio.append(max(served) * len(served) / sum(served))
        for node in sim.nodes:
            done = [self.attn[e.idx] - self._attn[e.idx] for e in node.pes]
            if done and sum(done) > 0:
                self.attn_ratio.append(max(done) * len(done) / sum(done))
        self._attn = list(self.attn)
        if loop._heap:  # anything left to happen: the run goes on
            loop.at(loop.now + self.interval, self._sample)

    def summary(self) -> dict[str, Any]:
        """Mean and P90 of each max/avg ratio over the windows."""
        out: dict[str, Any] = {"window_s": self.interval}
        for key, values in (("snic", self.snic_ratio), ("attention", self.attn_ratio)):
            v = np.asarray(values)
            out[f"{key}_max_avg"] = round(float(v.mean()), 3) if v.size else None
            out[f"{key}_max_avg_p90"] = round(float(np.percentile(v, 90)), 3) if v.size else None
        return out
