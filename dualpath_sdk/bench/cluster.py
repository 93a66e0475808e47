"""The storage-bound cluster benchmark: agents replayed through real clusters in every mode.

Each run starts a real cluster (engine processes, the default model, the fs store with fsync) whose
nodes' storage NICs are capped (SNIC_BPS), so loading the KV of an agent's history takes longer
than computing its new tokens, as in PAPER.md's evaluation. Every agent's first turn is primed
once, untimed, and each run starts from a copy of that store, so every mode reads the same bytes.

Sections (docs/benchmarks.md says more):
- offline: N synthetic agents (PAPER.md's workload table scaled down: append : generate = 4 : 1,
  zero tool latency) start together on 1P1D and 1P2D; the job completion time (JCT) of each mode,
  its speed-up over basic beside the ideal (P+D)/P, each node's storage-NIC utilisation (busiest and
  mean over 4 s windows) and the TTFT broken into queue, read and prefill.
- online: the synthetic agents on 1P1D, one alone (light load) and all arriving as a Poisson
  process at 0.8x basic's offline throughput; TTFT and TPOT percentiles.
- trace: block-level replay of ../shared/traces' conversation trace on 1P1D: each conversation is an
  agent, each of its requests a prompt built from its hash_ids (one 512-token hash block becomes one
  64-token KV block, so shared hash prefixes are shared KV), generation lengths scaled down.
Greedy outputs of every non-oracle mode must agree token for token; the JSON says whether they did.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dualpath_sdk.api.cluster import Cluster
from dualpath_sdk.api.session import StepResult
from dualpath_sdk.config import ClusterConfig, EngineConfig, SchedulerConfig, StoreConfig

BLOCK = 64
SNIC_BPS = 24e6  # every node's storage-NIC read cap: storage, not compute, bounds these runs
TRACE_SNIC_BPS = 12e6  # the trace's turns add more new tokens per cached one: a lower cap keeps it so
TENANT = "bench"
TRACE = Path(  # the workplace's ../shared/traces beside the repository, or $DUALPATH_TRACE
    os.environ.get(
        "DUALPATH_TRACE",
        Path(__file__).resolve().parents[3] / "shared" / "traces" / "mooncake_conversation_trace.jsonl",
    )
)

# row -> (cluster mode, split reads)
ROWS: dict[str, tuple[str, bool]] = {
    "basic": ("basic", False),
    "dualpath": ("dualpath", False),
    "dualpath+split": ("dualpath", True),
    "oracle": ("oracle", False),
}
TOPOLOGIES = {"1P1D": (1, 1), "1P2D": (1, 2)}
RESULTS = Path("bench-results")  # under the working directory: the plot and the figures
PLOT, FIGURES = RESULTS / "cluster.png", RESULTS / "cluster.json"

Figures = dict[str, float | int | bool | str]


@dataclass(frozen=True)
class Turn:
    tokens: list[int]  # appended to the session (synthetic agents), or the whole prompt (trace)
    gen: int


@dataclass(frozen=True)
class Agent:
    name: str
    turns: list[Turn]  # turns[0] is primed, untimed
    continues: bool  # True: one session appends every turn; False: every turn is a fresh prompt


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

    def mean(self, pick: Callable[[StepResult], float]) -> float:
        return statistics.fmean(pick(s.result) for s in self.steps)

    def percentile(self, pick: Callable[[StepResult], float], q: float) -> float:
        values = sorted(pick(s.result) for s in self.steps)
        return values[min(len(values) - 1, math.ceil(q * len(values)) - 1)]


# ---- workloads ------------------------------------------------------------------------------------


def synthetic_agents(n: int, turns: int, first: int, append: int, gen: int, vocab: int) -> list[Agent]:
    """Agents of PAPER.md's table scaled down: a first prompt, then `turns` appends of `append` tokens."""
    agents = []
    for a in range(n):
        rng = random.Random(a)
        sizes = [first] + [append] * turns
        agents.append(
            Agent(f"agent{a}", [Turn([rng.randrange(vocab) for _ in range(k)], gen) for k in sizes], True)
        )
    return agents


def trace_agents(n: int, turns: int, vocab: int, max_blocks: int = 32, path: Path = TRACE) -> list[Agent]:
    """The first `n` conversations of the trace with more than `turns` requests of at most `max_blocks`.

    A request continues the conversation whose blocks its hash_ids prefix ends in (the shared system
    block 0 aside). Hash block h becomes 64 tokens drawn from Random(h); a prompt is input_length / 8
    tokens of its blocks; generation is output_length / 32, clipped to [1, 16] (decode stays light).
    """
    requests = [json.loads(line) for line in path.read_text().splitlines()]
    owner: dict[int, int] = {}
    conversations: dict[int, list[dict]] = {}
    for i, r in enumerate(requests):
        ids = r["hash_ids"]
        k = 0
        while k < len(ids) and ids[k] in owner:
            k += 1
        root = owner[ids[k - 1]] if k >= 2 else i
        conversations.setdefault(root, []).append(r)
        for h in ids[k:]:
            owner[h] = root
    blocks: dict[int, list[int]] = {}

    def tokens(r: dict) -> list[int]:
        for h in r["hash_ids"]:
            if h not in blocks:
                rng = random.Random(h)
                blocks[h] = [rng.randrange(vocab) for _ in range(BLOCK)]
        return [t for h in r["hash_ids"] for t in blocks[h]][: -(-r["input_length"] // 8)]

    agents = []
    for root, conv in conversations.items():
        if len(conv) > turns and all(len(r["hash_ids"]) <= max_blocks for r in conv[: turns + 1]):
            chosen = conv[: turns + 1]
            agents.append(
                Agent(
                    f"conv{root}",
                    [Turn(tokens(r), min(16, max(1, r["output_length"] // 32))) for r in chosen],
                    False,
                )
            )
        if len(agents) == n:
            break
    return agents


# ---- one cluster run ------------------------------------------------------------------------------


def _config(root: Path, topology: str, row: str, cap: float | None, slots: int) -> ClusterConfig:
    p, d = TOPOLOGIES[topology]
    mode, split = ROWS[row]
    return ClusterConfig(
        prefill_nodes=p,
        decode_nodes=d,
        mode=mode,
        scheduler=SchedulerConfig(split_reads=split),
        engine=EngineConfig(block_size=BLOCK, num_blocks=slots),
        store=StoreConfig(root=root, snic_read_bps=cap),
        buffer_slots=slots,
    )


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


def prime(root: Path, agents: list[Agent], slots: int) -> None:
    """Run every agent's first turn once, uncapped: the store every timed run starts from."""
    with Cluster(_config(root, "1P1D", "dualpath", None, slots)) as cluster:
        _sessions_for(agents, cluster)
        _run_agents(cluster, agents, range(1), [0.0] * len(agents))


def _utilisation(samples: list[tuple[float, dict[str, tuple[float, float]]]], cap: float) -> dict:
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
    slots: int,
    arrivals: list[float] | None = None,
    cap: float = SNIC_BPS,
) -> Run:
    """One timed run: a fresh copy of the primed store, a capped cluster, every agent's turns 1.."""
    work = primed.parent / f"{topology}-{row}"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(primed, work)
    try:
        with Cluster(_config(work, topology, row, cap, slots)) as cluster:
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
    return Run(topology, row, jct, steps, _utilisation(samples, cap), outputs)


# ---- sections -------------------------------------------------------------------------------------


def _ttft_cells(r: Run) -> list[str]:
    return [
        f"{r.mean(lambda s: s.timings.ttft_s):.2f}",
        f"{r.mean(lambda s: s.timings.queue_s):.2f}",
        f"{r.mean(lambda s: s.timings.read_s):.2f}",
        f"{r.mean(lambda s: s.timings.prefill_s):.2f}",
    ]


def _nic_cells(r: Run) -> list[str]:
    """PE and DE storage NICs: busiest 4 s window / mean over the run (DE: over its nodes)."""
    cells = []
    for role in ("pe", "de"):
        nodes = [v for node, v in r.nic.items() if node.startswith(role)]
        busy, mean = max(b for b, _ in nodes), statistics.fmean(m for _, m in nodes)
        cells.append(f"{busy:.0%} / {mean:.0%}")
    return cells


def _offline_table(console: Console, title: str, runs: list[Run]) -> Figures:
    figures: Figures = {}
    basic = {r.topology: r.jct_s for r in runs if r.row == "basic"}
    table = Table(title=title)
    columns = ("nodes", "mode", "JCT s", "x basic", "ideal", "cached", "TTFT s", "queue", "read", "prefill")
    for column in (*columns, "PE SNIC", "DE SNIC"):  # read use of the cap: busiest 4 s / mean
        table.add_column(column, justify="right")
    for r in runs:
        p, d = TOPOLOGIES[r.topology]
        speedup = basic[r.topology] / r.jct_s
        ideal = f"{(p + d) / p:.1f}x" if r.row.startswith("dualpath") else ""  # oracle is compute-bound
        share = _cached_share(r)
        cells = (f"{r.jct_s:.1f}", f"{speedup:.2f}x", ideal, f"{share:.3f}", *_ttft_cells(r), *_nic_cells(r))
        table.add_row(r.topology, r.row, *cells)
        key = f"{title.split()[0]}_{r.topology}_{r.row}"
        figures[f"{key}_jct_s"] = round(r.jct_s, 2)
        figures[f"{key}_vs_basic"] = round(speedup, 3)
        figures[f"{key}_ttft_s"] = round(r.mean(lambda s: s.timings.ttft_s), 3)
        figures[f"{key}_cached_share"] = round(share, 4)
        for node, (_, mean) in r.nic.items():
            figures[f"{key}_{node}_nic_mean"] = round(mean, 3)
    console.print(table)
    console.print(
        "cached: share of prompt tokens loaded, not computed; TTFT = queue + read + prefill (means, s); "
        "SNIC: read use of the cap, busiest 4 s / mean"
    )
    return figures


def _cached_share(r: Run) -> float:
    """Prompt tokens whose KV was loaded over all prompt tokens: a continued session reloads every
    history token but the last one sampled (Full Blocks and the partial block after them)."""
    prompt = sum(s.result.usage.prompt_tokens for s in r.steps)
    return sum(s.result.usage.cached_tokens for s in r.steps) / prompt if prompt else 0.0


def _outputs_agree(runs: list[Run]) -> bool:
    exact = [r.outputs for r in runs if r.row != "oracle"]
    return all(o == exact[0] for o in exact[1:])


def _plot(path: Path, runs: list[Run]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    topologies = list(dict.fromkeys(r.topology for r in runs))
    rows = list(dict.fromkeys(r.row for r in runs))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        xs = [t + (i - (len(rows) - 1) / 2) * width for t in range(len(topologies))]
        jct = [next((r.jct_s for r in runs if r.topology == t and r.row == row), 0.0) for t in topologies]
        ax.bar(xs, jct, width, label=row)
    ax.set_xticks(range(len(topologies)), topologies)
    ax.set_ylabel("job completion time (s)")
    ax.set_title(f"offline agents, storage NIC capped at {SNIC_BPS / 1e6:.0f} MB/s per node")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _poisson(n: int, rate: float, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def _latency_table(console: Console, title: str, runs: list[Run]) -> Figures:
    figures: Figures = {}
    table = Table(title=title)
    for column in ("load", "mode", "steps", "TTFT p50", "p90", "p99", "read mean", "TPOT p50", "p90"):
        table.add_column(column, justify="right")
    for r in runs:
        ttft = [r.percentile(lambda s: s.timings.ttft_s, q) for q in (0.5, 0.9, 0.99)]
        tpot = [r.percentile(lambda s: s.timings.tpot_s, q) for q in (0.5, 0.9)]
        read = r.mean(lambda s: s.timings.read_s)
        table.add_row(
            r.topology,
            r.row,
            str(len(r.steps)),
            *(f"{v:.2f}" for v in ttft),
            f"{read:.2f}",
            *(f"{v * 1e3:.0f} ms" for v in tpot),
        )
        key = f"online_{r.topology}_{r.row}"
        figures[f"{key}_ttft_p50_s"] = round(ttft[0], 3)
        figures[f"{key}_ttft_p90_s"] = round(ttft[1], 3)
        figures[f"{key}_tpot_p50_ms"] = round(tpot[0] * 1e3, 1)
    console.print(table)
    return figures


def offline(
    console: Console,
    out: Path,
    agents: list[Agent],
    topologies: tuple[str, ...],
    rows: tuple[str, ...],
    slots: int,
    cap: float = SNIC_BPS,
) -> list[Run]:
    primed = out / "primed"
    started = time.perf_counter()
    prime(primed, agents, slots)
    console.print(f"primed {len(agents)} agents' first turns in {time.perf_counter() - started:.1f} s")
    runs = []
    for topology in topologies:
        for row in rows:
            started = time.perf_counter()
            runs.append(run(primed, agents, topology, row, slots, cap=cap))
            wall = time.perf_counter() - started
            console.print(f"{topology} {row}: JCT {runs[-1].jct_s:.1f} s ({wall:.1f} s with start-up)")
    return runs


def online(console: Console, out: Path, agents: list[Agent], basic_rate: float, slots: int) -> list[Run]:
    """1P1D: light load (one agent at a time) and Poisson arrivals at 0.8x basic's offline rate."""
    primed = out / "primed"
    rows = ("basic", "dualpath", "dualpath+split")
    runs = []
    for row in rows:
        r = run(primed, agents[:1], "1P1D", row, slots)
        r.topology = "1 agent"
        runs.append(r)
    rate = 0.8 * basic_rate
    for row in rows:
        r = run(primed, agents, "1P1D", row, slots, arrivals=_poisson(len(agents), rate))
        r.topology = f"{rate:.3f}/s"
        runs.append(r)
    return runs


def _vocab() -> int:
    from transformers import AutoConfig

    from dualpath_sdk.model.loader import default_model_dir

    return int(AutoConfig.from_pretrained(default_model_dir()).vocab_size)


def main(quick: bool) -> Figures:
    console = Console(width=None if sys.stdout.isatty() else 120)  # the offline table has 11 columns
    out = Path(tempfile.mkdtemp(prefix="dualpath-bench-cluster-"))
    figures: Figures = {"snic_mb_s": SNIC_BPS / 1e6, "trace_snic_mb_s": TRACE_SNIC_BPS / 1e6}
    slots = 192
    try:
        vocab = _vocab()
        n, turns = (4, 1) if quick else (8, 4)
        agents = synthetic_agents(n, turns, first=1024, append=40, gen=10, vocab=vocab)
        rows = ("basic", "dualpath+split") if quick else tuple(ROWS)
        runs = offline(console, out / "synthetic", agents, tuple(TOPOLOGIES), rows, slots)
        figures |= _offline_table(console, "offline synthetic agents", runs)
        figures["outputs_match"] = _outputs_agree(runs)
        _plot(PLOT, runs)
        console.print(f"plot: {PLOT}")
        if quick:
            return _saved(figures)
        basic_jct = next(r.jct_s for r in runs if r.topology == "1P1D" and r.row == "basic")
        latency = online(console, out / "synthetic", agents, len(agents) / basic_jct, slots)
        figures |= _latency_table(console, "online synthetic agents, 1P1D", latency)
        if not TRACE.is_file():
            console.print(f"trace section skipped: no {TRACE} (set DUALPATH_TRACE)")
            return _saved(figures)
        conversations = trace_agents(6, 3, vocab)
        trace_rows = ("basic", "dualpath", "dualpath+split")  # oracle counts a session's history: none here
        trace = offline(console, out / "trace", conversations, ("1P1D",), trace_rows, slots, TRACE_SNIC_BPS)
        figures |= _offline_table(console, "trace block-level replay", trace)
        figures["trace_outputs_match"] = _outputs_agree(trace)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return _saved(figures)


def _saved(figures: Figures) -> Figures:
    FIGURES.parent.mkdir(exist_ok=True)
    FIGURES.write_text(json.dumps(figures, indent=1, sort_keys=True) + "\n")
    Console().print(f"figures: {FIGURES}")
    return figures
