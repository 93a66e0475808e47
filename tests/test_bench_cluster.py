"""The cluster benchmark's workloads and figures; its quick run end to end is marked slow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dualpath_sdk.bench.cluster.report import cached_share, speedups, verdict
from dualpath_sdk.bench.cluster.runs import Run, Step, utilisation
from dualpath_sdk.bench.cluster.workloads import BLOCK, synthetic_agents, trace_agents


def _trace(path: Path, requests: list[tuple[list[int], int, int]]) -> Path:
    lines = [
        json.dumps({"timestamp": i, "input_length": n, "output_length": out, "hash_ids": ids})
        for i, (ids, n, out) in enumerate(requests)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_trace_conversations_share_kv_exactly_where_their_hash_ids_do(tmp_path: Path) -> None:
    trace = _trace(
        tmp_path / "t.jsonl",
        [
            ([0, 1, 2], 1300, 100),  # conversation A
            ([0, 3], 700, 640),  # conversation B: only the shared system block 0 in common with A
            ([0, 1, 2, 4], 1900, 10),  # A, turn 2
            ([0, 3, 5], 1100, 2000),  # B, turn 2
            ([0, 1, 2, 4, 6], 2400, 64),  # A, turn 3
        ],
    )
    agents = trace_agents(5, 1, vocab=1000, path=trace)
    assert [a.name for a in agents] == ["conv0", "conv1"]
    a, b = agents
    assert [len(t.tokens) for t in a.turns] == [163, 238]  # input_length / 8, rounded up
    assert [t.gen for t in a.turns] == [3, 1]  # output_length / 32 in [1, 16]
    assert [t.gen for t in b.turns] == [16, 16]
    assert a.turns[1].tokens[:163] == a.turns[0].tokens  # A's turn 2 extends its turn 1's blocks
    assert a.turns[0].tokens[:BLOCK] == b.turns[0].tokens[:BLOCK]  # hash block 0 is shared
    assert a.turns[0].tokens[BLOCK : 2 * BLOCK] != b.turns[0].tokens[BLOCK : 2 * BLOCK]
    assert not a.continues
    assert [c.name for c in trace_agents(5, 2, vocab=1000, path=trace)] == ["conv0"]  # B has 2 requests
    assert [c.name for c in trace_agents(5, 1, vocab=1000, max_blocks=3, path=trace)] == ["conv1"]


def test_synthetic_agents_are_seeded_and_sized() -> None:
    agents = synthetic_agents(3, 2, first=100, append=10, gen=4, vocab=50)
    assert [[len(t.tokens) for t in a.turns] for a in agents] == [[100, 10, 10]] * 3
    assert agents == synthetic_agents(3, 2, first=100, append=10, gen=4, vocab=50)
    assert agents[0].turns[0].tokens != agents[1].turns[0].tokens
    assert all(a.continues and all(t.gen == 4 for t in a.turns) for a in agents)


def test_utilisation_is_bytes_per_window_over_the_cap() -> None:
    node = "abcd-pe-node0"
    # 10 B/s for 8 s, then idle for 4 s, sampled every second; cap 20 B/s
    samples = [(float(t), {node: (10.0 * min(t, 8), 0.0)}) for t in range(13)]
    busiest, mean = utilisation(samples, 20.0)["pe-node0"]
    assert busiest == pytest.approx(0.5)
    assert mean == pytest.approx(80 / 12 / 20)


def test_the_cached_share_counts_tokens_not_blocks() -> None:
    from types import SimpleNamespace

    def step(prompt: int, cached: int) -> Step:
        usage = SimpleNamespace(prompt_tokens=prompt, cached_tokens=cached)
        return Step("a", 1, SimpleNamespace(usage=usage))  # type: ignore[arg-type]

    run = Run("1P1D", "basic", 1.0, [step(1074, 1033), step(1124, 1083)], {})
    assert cached_share(run) == pytest.approx((1033 + 1083) / (1074 + 1124))


def test_speed_ups_are_against_the_same_rounds_basic_and_verdicts_need_every_round() -> None:
    runs = [
        Run("1P2D", row, jct, [], {}, repeat=k)
        for k, (basic, one_side, split) in enumerate([(60.0, 30.0, 20.0), (90.0, 30.0, 45.0)])
        for row, jct in (("basic", basic), ("dualpath", one_side), ("dualpath+split", split))
    ]
    ratios = speedups(runs)
    assert ratios["1P2D", "basic"] == [1.0, 1.0]
    assert ratios["1P2D", "dualpath"] == [2.0, 3.0]
    assert ratios["1P2D", "dualpath+split"] == [3.0, 2.0]
    assert verdict(ratios["1P2D", "dualpath"], ratios["1P2D", "dualpath+split"]) == "equal within 2%"
    assert verdict([2.0, 2.6], [2.4, 3.0]) == "within the spread"  # medians 17% apart, the rounds disagree
    assert verdict([2.0, 2.1], [2.2, 2.5]) == "split faster"
    assert verdict([2.6, 2.7], [2.2, 2.5]) == "one side faster"
    assert verdict([1.95, 1.96], [1.965, 1.97]) == "equal within 2%"  # apart, but by 0.5%
    assert verdict([2.0], [3.0]) == "one round: undecided"


@pytest.mark.slow
def test_the_quick_cluster_benchmark_runs_and_modes_agree(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dualpath_sdk.bench", "cluster", "--quick"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["outputs_match"] is True
    assert figures["offline_1P1D_dualpath+split_vs_basic"] > 1.0
    # a 522-token history (512 primed + 10 generated) reloads all but its last token, 521 of 562
    assert figures["offline_1P1D_basic_cached_share"] == round(521 / 562, 4)
    assert (tmp_path / "bench-results" / "cluster.png").stat().st_size > 0
