"""One timed cluster run of the benchmark: a fresh copy of the primed store, a real cluster whose
storage NICs are capped, every agent driven by its own thread, and each node's storage-NIC use sampled."""

from __future__ import annotations

import math
import random
import shutil
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dualpath_sdk.api.cluster import Cluster
from dualpath_sdk.api.session import StepResult
from dualpath_sdk.bench.cluster.workloads import BLOCK, Agent
from dualpath_sdk.config import (
    ClusterConfig,
    EngineConfig,
    KVChoice,
    Mode,
    SchedulerConfig,
    StoreConfig,
    WeightChoice,
)

# every node's storage-NIC read cap: low enough that storage, not compute, bounds every row on 2 cores
# (oracle, which reads nothing, finishes several times faster than an ideal dualpath could)
SNIC_BPS = 12e6
TENANT = "bench"

# row -> (cluster mode, split reads)
ROWS: dict[str, tuple[Mode, bool]] = {
    "basic": ("basic", False),
    "dualpath": ("dualpath", False),
    "dualpath+split": ("dualpath", True),
    "oracle": ("oracle", False),
}
TOPOLOGIES = {"1P1D": (1, 1), "1P2D": (1, 2)}


@dataclass
class Step:
    agent: str
    turn: int
    result: StepResult


@dataclass
class Run:
    topology: str
    row: str
    jct_s: float
    steps: list[Step]
    nic: dict[str, tuple[float, float]]  # node -> (busiest 4 s window, mean) read utilisation
    outputs: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    repeat: int = 0  # which round of the rows this run belongs to

    def mean(self, pick: Callable[[StepResult], float]) -> float:
        return statistics.fmean(pick(s.result) for s in self.steps)

    def percentile(self, pick: Callable[[StepResult], float], q: float) -> float:
        values = sorted(pick(s.result) for s in self.steps)
        return values[min(len(values) - 1, math.ceil(q * len(values)) - 1)]


def _config(root: Path, topology: str, row: str, cap: float | None, engine: EngineConfig) -> ClusterConfig:
    p, d = TOPOLOGIES[topology]
    mode, split = ROWS[row]
    return ClusterConfig(
        prefill_nodes=p,
        decode_nodes=d,
        mode=mode,
        scheduler=SchedulerConfig(split_reads=split),
        engine=engine,
        store=StoreConfig(root=root, snic_read_bps=cap),
        buffer_slots=engine.num_blocks,
    )


def _fields(config: ClusterConfig) -> dict[str, Any]:
    """`config` as Cluster.ray's arguments (its storage the same StoreConfig)."""
    fields = {name: getattr(config, name) for name in config.model_fields_set}
    fields["storage"] = fields.pop("store")
    return fields


def _step(cluster: Cluster, agent: Agent, turn: int) -> StepResult:
    t = agent.turns[turn]
    # a trace request is a fresh prompt: the store finds the prefix earlier requests persisted
    session = cluster.resume(agent.name, tenant=TENANT) if agent.continues else cluster.session(tenant=TENANT)
    return session.step_tokens(t.tokens, max_tokens=t.gen, ignore_eos=True)


def _run_agents(cluster: Cluster, agents: list[Agent], turns: range, arrivals: list[float]) -> list[Step]:
    steps: list[Step] = []
    errors: list[BaseException] = []
    start = time.perf_counter()

    def drive(agent: Agent, arrival: float) -> None:
        time.sleep(max(0.0, start + arrival - time.perf_counter()))
        try:
            for turn in turns:
                steps.append(Step(agent.name, turn, _step(cluster, agent, turn)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=drive, args=(a, t)) for a, t in zip(agents, arrivals, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return steps


def _sessions_for(agents: list[Agent], cluster: Cluster) -> None:
    for agent in agents:
        if agent.continues:
            cluster.session(session_id=agent.name, tenant=TENANT)


def engine_config(slots: int, weights: WeightChoice = "auto", kv_dtype: KVChoice = "auto") -> EngineConfig:
    """Every run's engines: `slots` KV blocks (and buffer slots), in the given precisions."""
    return EngineConfig(block_size=BLOCK, num_blocks=slots, weights=weights, kv_dtype=kv_dtype)


def prime(root: Path, agents: list[Agent], engine: EngineConfig) -> None:
    """Run every agent's first turn once, uncapped: the store every timed run starts from."""
    with Cluster(_config(root, "1P1D", "dualpath", None, engine)) as cluster:
        _sessions_for(agents, cluster)
        _run_agents(cluster, agents, range(1), [0.0] * len(agents))


def utilisation(samples: list[tuple[float, dict[str, tuple[float, float]]]], cap: float) -> dict:
    """Each node's read bytes per 4 s window over the run, as a fraction of the cap (a window holds
    a whole number of ~3 MB blocks, so a busy one reads within a few % of 100)."""
    out = {}
    for node in samples[0][1]:
        rates = []
        t0, b0 = samples[0][0], samples[0][1][node][0]
        for t, nodes in samples[1:]:
            if t - t0 >= 4.0:
                rates.append((nodes[node][0] - b0) / (t - t0) / cap)
                t0, b0 = t, nodes[node][0]
        total = (samples[-1][1][node][0] - samples[0][1][node][0]) / (samples[-1][0] - samples[0][0]) / cap
        out[node.split("-", 1)[1]] = (max(rates, default=total), total)
    return out


def run(
    primed: Path,
    agents: list[Agent],
    topology: str,
    row: str,
    engine: EngineConfig,
    arrivals: list[float] | None = None,
    cap: float = SNIC_BPS,
    repeat: int = 0,
    on_ray: bool = False,
) -> Run:
    """One timed run: a fresh copy of the primed store, a capped cluster (`on_ray`: through Cluster.ray,
    on the Ray cluster this process is connected to), every agent's turns 1.."""
    work = primed.parent / f"{topology}-{row}"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(primed, work)
    config = _config(work, topology, row, cap, engine)
    try:
        with Cluster.ray(**_fields(config)) if on_ray else Cluster(config) as cluster:
            samples: list[tuple[float, dict[str, tuple[float, float]]]] = []
            done = threading.Event()

            def sample() -> None:
                while True:
                    samples.append((time.perf_counter(), cluster.storage_nic_bytes()))
                    if done.wait(0.25):
                        samples.append((time.perf_counter(), cluster.storage_nic_bytes()))
                        return

            sampler = threading.Thread(target=sample)
            sampler.start()
            start = time.perf_counter()
            turns = range(1, len(agents[0].turns))
            steps = _run_agents(cluster, agents, turns, arrivals or [0.0] * len(agents))
            jct = time.perf_counter() - start
            done.set()
            sampler.join()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    outputs = {(s.agent, s.turn): s.result.token_ids for s in steps}
    return Run(topology, row, jct, steps, utilisation(samples, cap), outputs, repeat)


def poisson(n: int, rate: float, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out
