"""The gateway's cost: the same agent turns in-process and through `dualpath serve`'s HTTP + SSE.

One cluster of the default model (1P1D) serves both sides, so they differ only in the way in: an
in-process `Session.stream`, or a `Cluster.connect` session streaming server-sent events from the
gateway on loopback. A ~2K-token task is prefilled once; every agent starts from a fork of it (the
context is cached, as in an agent's later turns) and steps tool results of ~60 tokens, 16 tokens
generated per turn, greedy. The agents of a side run concurrently; the sides alternate by round, and
each agent's turns are the same on both sides (so are their tokens: checked).

TTFT is the caller's: from the call to the first streamed text. The cluster's own TTFT (from the
step's submission to its first token, in every StepResult) moves with the load of the engines,
which on a small machine swamps what the way in costs; so the gateway's cost is read as what each
side's caller waits beyond the cluster's TTFT, gateway less in-process. Target: under 5% of TTFT.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

import dualpath_sdk as dp
from dualpath_sdk.gateway import create_app
from dualpath_sdk.gateway.serve import in_thread

CONTEXT_TOKENS = 2000
GEN = 16
SIDES = ("in-process", "gateway")


@dataclass
class Side:
    ttft_s: list[float] = field(default_factory=list)  # the caller's
    server_ttft_s: list[float] = field(default_factory=list)  # the cluster's, in the StepResult
    wall_s: float = 0.0
    steps: int = 0
    outputs: dict[tuple[int, int, int], list[int]] = field(default_factory=dict)  # (round, agent, turn)

    def outside_s(self) -> float:
        """The caller's TTFT beyond the cluster's: the way in and out (the engines' share is the
        same on both sides, and as noisy as the machine)."""
        return statistics.mean(self.ttft_s) - statistics.mean(self.server_ttft_s)


def main(quick: bool) -> dict[str, Any]:
    console = Console(width=None if sys.stdout.isatty() else 120)
    agents, turns, rounds = (2, 2, 2) if quick else (4, 5, 4)
    sides = {name: Side() for name in SIDES}
    with (
        tempfile.TemporaryDirectory(prefix="dualpath-bench-gateway-") as store,
        dp.Cluster.local(storage=store) as cluster,
        in_thread(create_app(cluster)) as url,
        dp.Cluster.connect(url) as remote,
    ):
        primed = cluster.session(system="You are a coding agent. Fix the failing tests.")
        primed.step(_task(cluster), max_tokens=GEN, ignore_eos=True)
        console.print(f"a primed context of {len(primed.token_ids)} tokens; {agents} agents x {turns} turns")
        for name in SIDES:  # a warm-up turn each, not counted
            session = primed.fork() if name == "in-process" else remote.resume(primed.fork().id)
            _run(Side(), -1, [session], 1)
        for r in range(rounds):
            for name in SIDES if r % 2 == 0 else SIDES[::-1]:
                forks = [primed.fork() for _ in range(agents)]
                sessions: list[dp.Session] = list(forks)
                if name == "gateway":
                    sessions = [remote.resume(f.id) for f in forks]
                _run(sides[name], r, sessions, turns)
    local, gate = sides["in-process"], sides["gateway"]
    same = local.outputs == gate.outputs
    table = Table(title=f"agent turns over a {CONTEXT_TOKENS}-token context, in-process vs gateway (SSE)")
    columns = ("side", "steps", "TTFT mean ms", "TTFT p50 ms", "cluster TTFT ms", "outside ms", "steps/s")
    for col in columns:
        table.add_column(col, justify="right")
    figures: dict[str, Any] = {"agents": agents, "turns": turns, "rounds": rounds, "outputs_match": same}
    for name, side in sides.items():
        rate = side.steps / side.wall_s
        table.add_row(
            name,
            str(side.steps),
            f"{1e3 * statistics.mean(side.ttft_s):.1f}",
            f"{1e3 * statistics.median(side.ttft_s):.1f}",
            f"{1e3 * statistics.mean(side.server_ttft_s):.1f}",
            f"{1e3 * side.outside_s():.1f}",
            f"{rate:.2f}",
        )
        key = name.replace("-", "_")
        figures[f"{key}_ttft_ms"] = round(1e3 * statistics.mean(side.ttft_s), 2)
        figures[f"{key}_steps_per_s"] = round(rate, 3)
    console.print(table)
    figures["ttft_ratio"] = round(statistics.mean(gate.ttft_s) / statistics.mean(local.ttft_s), 4)
    figures["throughput_ratio"] = round(figures["gateway_steps_per_s"] / figures["in_process_steps_per_s"], 4)
    cost = gate.outside_s() - local.outside_s()
    figures["gateway_cost_ms"] = round(1e3 * cost, 2)
    figures["gateway_cost_share"] = round(cost / statistics.mean(local.ttft_s), 4)
    console.print(
        f"gateway / in-process: TTFT x{figures['ttft_ratio']:.3f}, throughput "
        f"x{figures['throughput_ratio']:.3f}. The gateway's own cost (its caller's TTFT beyond the "
        f"cluster's, less the in-process caller's): {1e3 * cost:+.1f} ms, "
        f"{100 * figures['gateway_cost_share']:.2f}% of the in-process TTFT (target < 5%). "
        f"Same tokens on both sides: {same}"
    )
    return figures


def _task(cluster: dp.Cluster) -> str:
    """A test log of about CONTEXT_TOKENS tokens, as the agent's first turn."""
    tokenizer = cluster.facts.tokenizer
    assert tokenizer is not None
    lines, i = ["The test run printed:"], 0
    while len(tokenizer.encode("\n".join(lines))) < CONTEXT_TOKENS - 60:
        outcome = "FAILED" if i % 7 == 3 else "PASSED"
        lines.append(f"tests/test_module_{i % 37}.py::test_case_{i} {outcome} in 0.{i % 97:02d}s")
        i += 1
    return "\n".join(lines)


def _tool_result(agent: int, turn: int) -> dict[str, str]:
    rows = [f"src/pkg/mod_{agent}_{turn}_{j}.py:{10 * j + turn}: E{agent}{j} unused name" for j in range(4)]
    return {"role": "user", "content": f"Tool output (run {turn}):\n" + "\n".join(rows)}


def _run(side: Side, round_: int, sessions: list[dp.Session], turns: int) -> None:
    """The agents of one side at once; each steps its turns one after another."""
    lock = threading.Lock()
    failures: list[BaseException] = []

    def agent(i: int) -> None:
        for t in range(turns):
            start, first = time.perf_counter(), None
            for item in sessions[i].events(_tool_result(i, t), max_tokens=GEN, ignore_eos=True):
                if first is None and isinstance(item, dp.StepChunk) and item.text:
                    first = time.perf_counter() - start
            assert isinstance(item, dp.StepResult) and first is not None
            with lock:
                side.ttft_s.append(first)
                side.server_ttft_s.append(item.timings.ttft_s)
                side.outputs[(round_, i, t)] = item.token_ids
                side.steps += 1

    def guarded(i: int) -> None:
        try:
            agent(i)
        except BaseException as exc:  # re-raised in the caller's thread
            failures.append(exc)

    start = time.perf_counter()
    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(len(sessions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    side.wall_s += time.perf_counter() - start
    if failures:
        raise failures[0]
