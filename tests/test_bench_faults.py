"""The fault benchmark's helpers; its quick run end to end (real clusters, real kills) is marked slow."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from dualpath_sdk.bench.faults import (
    HEADER_BYTES,
    KILLS,
    damage,
    first_difference,
    session_mismatch,
    step_phase,
    unplanned_restarts,
    workload,
)


@pytest.mark.parametrize(
    ("state", "phase"),
    [
        ((None, None, "none", None, False, False), "queued"),  # not placed, or placed again after a retry
        (("pe0", "de0", "split", object(), True, True), "decode"),  # the first token streamed: reads are moot
        (("pe0", "de0", "split", None, True, False), "pe-read"),
        (("pe0", "de0", "pe", None, True, True), "pe-read"),
        (("pe0", "de0", "split", None, False, True), "de-read"),
        (("pe0", "de0", "split", None, False, False), "prefill"),
        # a side with no share of the plan's reads is never "reading", whatever its engine does
        (("pe0", "de0", "de", None, True, False), "prefill"),
        (("pe0", "de0", "pe", None, False, True), "prefill"),
        (("pe0", "de0", "none", None, True, True), "prefill"),
    ],
)
def test_a_step_phase_follows_its_placement_its_plan_and_its_engines_reads(
    state: tuple[object, ...], phase: str
) -> None:
    assert step_phase(*state) == phase  # type: ignore[arg-type]


def test_a_session_matches_its_record_only_token_for_token() -> None:
    record = [5, 6, 7, 8]
    assert session_mismatch(record, [5, 6, 7, 8]) is None
    assert first_difference(record, [5, 6, 9, 8]) == 2
    assert "first difference at 2" in (session_mismatch(record, [5, 6, 9, 8]) or "")
    # a failed step that left its prompt (or part of it) behind is a change, as is a lost turn
    assert first_difference(record, [*record, 1, 2]) == 4
    assert "6 tokens stored vs 4 recorded" in (session_mismatch(record, [*record, 1, 2]) or "")
    assert first_difference(record, record[:2]) == 2
    assert session_mismatch([], []) is None


def test_only_restarts_beyond_one_per_kill_are_unplanned() -> None:
    assert unplanned_restarts({"pe0": 2, "de0": 0}, {"pe0": 2}) == 0
    assert unplanned_restarts({"pe0": 3, "de0": 1}, {"pe0": 2}) == 2
    assert unplanned_restarts({"pe0": 0, "de0": 0}, {"pe0": 1}) == 0  # a kill not yet respawned


def test_damage_flips_payload_bytes_or_truncates(tmp_path: Path) -> None:
    original = bytes(range(256)) * (HEADER_BYTES // 256) + bytes(8192)
    path = tmp_path / "block.kv"
    path.write_bytes(original)
    damage(path, "corrupt", random.Random(1))
    corrupted = path.read_bytes()
    assert len(corrupted) == len(original)
    assert corrupted[:HEADER_BYTES] == original[:HEADER_BYTES]  # the header is left to its own checksum
    flipped = [i for i, (a, b) in enumerate(zip(original, corrupted, strict=True)) if a != b]
    assert 1 <= len(flipped) <= 8 and all(i >= HEADER_BYTES for i in flipped)
    damage(path, "truncate", random.Random(2))
    assert path.stat().st_size < len(original)


def test_the_workload_is_seeded_and_sized() -> None:
    agents = workload(3, 4, vocab=1000)
    assert agents == workload(3, 4, vocab=1000)
    assert len({a.name for a in agents}) == 3
    for agent in agents:
        assert 248 <= len(agent.first) <= 264
        assert len(agent.turns) == 4 and all(40 <= len(t) <= 56 for t in agent.turns)
        assert all(0 <= t < 1000 for turn in [agent.first, *agent.turns] for t in turn)
    assert agents[0].first != agents[1].first


@pytest.mark.slow
def test_the_quick_fault_benchmark_meets_its_targets(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dualpath_sdk.bench", "faults", "--quick"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1800,
        check=True,
    )
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["all_targets_met"] is True, figures["problems"]
    for scenario in KILLS:
        row = figures[f"{scenario}_1P1D"]
        assert row["injections"] >= 1, (scenario, row)
        assert sum(row["engine_restarts"].values()) >= row["injections"], row  # every kill respawned
