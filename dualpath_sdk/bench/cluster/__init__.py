"""The storage-bound cluster benchmark: agents replayed through real clusters in every mode.

Each run starts a real cluster (engine processes, the default model, the fs store with fsync) whose
nodes' storage NICs are capped (SNIC_BPS), so loading the KV of an agent's history takes longer
than computing its new tokens, as in PAPER.md's evaluation. Every agent's first turn is primed
once, untimed, and each run starts from a copy of that store, so every mode reads the same bytes.

Sections (docs/benchmarks.md says more):
- offline: N synthetic agents (PAPER.md's workload table scaled down: append : generate = 4 : 1,
  zero tool latency) start together on 1P1D and 1P2D, every mode once per round, rounds repeated
  (ROUNDS) so that each figure has its spread; the job completion time (JCT) of each mode, its
  speed-up over the same round's basic beside the ideal (P+D)/P, each node's storage-NIC utilisation
  (busiest and mean over 4 s windows) and the TTFT broken into queue, read and prefill.
- online: the synthetic agents on 1P1D, one alone (light load) and all arriving as a Poisson
  process at 0.8x basic's offline throughput; TTFT and TPOT percentiles.
- trace: block-level replay of ../shared/traces' conversation trace on 1P1D: each conversation is an
  agent, each of its requests a prompt built from its hash_ids (one 512-token hash block becomes one
  64-token KV block, so shared hash prefixes are shared KV), generation lengths scaled down.
Greedy outputs of every non-oracle mode must agree token for token; the JSON says whether they did.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from dualpath_sdk.bench.cluster.report import (
    PLOT,
    Figures,
    latency_table,
    offline_table,
    outputs_agree,
    plot,
    saved,
)
from dualpath_sdk.bench.cluster.runs import (
    ROWS,
    SNIC_BPS,
    TOPOLOGIES,
    Run,
    engine_config,
    poisson,
    prime,
    run,
)
from dualpath_sdk.bench.cluster.workloads import TRACE, Agent, synthetic_agents, trace_agents
from dualpath_sdk.config import EngineConfig, KVChoice, WeightChoice

ROUNDS = 3  # of the offline rows in a full run; --quick runs one


def offline(
    console: Console,
    out: Path,
    agents: list[Agent],
    topologies: tuple[str, ...],
    rows: tuple[str, ...],
    engine: EngineConfig,
    rounds: int = 1,
) -> list[Run]:
    """Prime the agents' first turns once, then `rounds` rounds of one timed run per topology and row,
    all from that store; interleaved, so a slow spell of the machine falls on every row alike."""
    primed = out / "primed"
    started = time.perf_counter()
    prime(primed, agents, engine)
    console.print(f"primed {len(agents)} agents' first turns in {time.perf_counter() - started:.1f} s")
    runs = []
    for repeat in range(rounds):
        for topology in topologies:
            for row in rows:
                started = time.perf_counter()
                runs.append(run(primed, agents, topology, row, engine, repeat=repeat))
                wall = time.perf_counter() - started
                console.print(
                    f"round {repeat + 1}/{rounds} {topology} {row}: "
                    f"JCT {runs[-1].jct_s:.1f} s ({wall:.1f} s with start-up)"
                )
    return runs


def online(
    console: Console, out: Path, agents: list[Agent], basic_rate: float, engine: EngineConfig
) -> list[Run]:
    """1P1D: light load (one agent at a time) and Poisson arrivals at 0.8x basic's offline rate."""
    primed = out / "primed"
    rows = ("basic", "dualpath", "dualpath+split")
    runs = []
    for row in rows:
        r = run(primed, agents[:1], "1P1D", row, engine)
        r.topology = "1 agent"
        runs.append(r)
    rate = 0.8 * basic_rate
    for row in rows:
        r = run(primed, agents, "1P1D", row, engine, arrivals=poisson(len(agents), rate))
        r.topology = f"{rate:.3f}/s"
        runs.append(r)
    return runs


def _vocab() -> int:
    from transformers import AutoConfig

    from dualpath_sdk.model.loader import default_model_dir

    return int(AutoConfig.from_pretrained(default_model_dir()).vocab_size)


def main(
    quick: bool, ray: bool = False, weights: WeightChoice = "auto", kv_dtype: KVChoice = "auto"
) -> Figures:
    """`weights`, `kv_dtype`: the engines' (EngineConfig's; "auto" is int4 and fp16 KV for the default
    model, `--weights fp32 --kv-dtype fp32` the form of the runs before they were the default). `ray`: the
    offline rows through local mode and through Ray instead (on_ray.py)."""
    if ray:
        from dualpath_sdk.bench.cluster.on_ray import main as through_ray

        return through_ray(quick, engine_config(192, weights, kv_dtype))
    console = Console(width=None if sys.stdout.isatty() else 160)  # the offline table has 12 columns
    out = Path(tempfile.mkdtemp(prefix="dualpath-bench-cluster-"))
    figures: Figures = {"snic_mb_s": SNIC_BPS / 1e6, "weights": weights, "kv_dtype": kv_dtype}
    engine = engine_config(192, weights, kv_dtype)
    try:
        vocab = _vocab()
        n, turns, first = (4, 1, 512) if quick else (8, 2, 1024)
        agents = synthetic_agents(n, turns, first=first, append=40, gen=10, vocab=vocab)
        rows = ("basic", "dualpath+split") if quick else tuple(ROWS)
        rounds = 1 if quick else ROUNDS
        runs = offline(console, out / "synthetic", agents, tuple(TOPOLOGIES), rows, engine, rounds)
        figures |= offline_table(console, "offline synthetic agents", runs)
        figures["outputs_match"] = outputs_agree(runs)
        plot(PLOT, runs)
        console.print(f"plot: {PLOT}")
        if quick:
            return saved(figures)
        basic_jct = statistics.median(r.jct_s for r in runs if r.topology == "1P1D" and r.row == "basic")
        latency = online(console, out / "synthetic", agents, len(agents) / basic_jct, engine)
        figures |= latency_table(console, "online synthetic agents, 1P1D", latency)
        if not TRACE.is_file():
            console.print(f"trace section skipped: no {TRACE} (set DUALPATH_TRACE)")
            return saved(figures)
        conversations = trace_agents(6, 3, vocab)
        trace_rows = ("basic", "dualpath", "dualpath+split")  # oracle counts a session's history: none here
        trace = offline(console, out / "trace", conversations, ("1P1D",), trace_rows, engine)
        figures |= offline_table(console, "trace block-level replay", trace)
        figures["trace_outputs_match"] = outputs_agree(trace)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return saved(figures)
