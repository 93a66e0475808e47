"""The gateway benchmark's quick run end to end (slow: it prefills the default model's 2K context)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_the_quick_gateway_benchmark_runs_and_both_sides_agree(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dualpath_sdk.bench", "gateway", "--quick"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["outputs_match"] is True  # the same tokens in-process and through the gateway
    assert figures["in_process_steps_per_s"] > 0 and figures["gateway_steps_per_s"] > 0
    assert {"ttft_ratio", "throughput_ratio", "gateway_cost_ms", "gateway_cost_share"} <= figures.keys()
