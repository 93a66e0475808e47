"""Every example runs as a user would run it (a subprocess, no main guard), on the tiny chat model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Pair

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


AGENTS = ["llamaindex_agent.py", "langgraph_agent.py"]  # on the adapters in integrations/


@pytest.mark.parametrize("name", ["tool_agent.py", "branching_search.py", "async_agents.py", *AGENTS])
def test_the_example_runs(name: str, chat_pair: Pair, tmp_path: Path) -> None:
    env = {**os.environ, "DUALPATH_MODEL": str(chat_pair.path), "DUALPATH_CACHE": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    if name == "tool_agent.py":
        turns = [line for line in lines if line.startswith("turn ")]
        assert len(turns) == 3 and all("read_file" in t for t in turns)
        cached = [int(t.split("cached ")[1].split(",")[0]) for t in turns]
        assert cached == sorted(cached) and cached[0] > 0  # the history grows and is reloaded
    elif name == "branching_search.py":
        cached = [int(line.split("cached")[1].split()[0]) for line in lines if "cached" in line]
        assert len(cached) == 3 and len(set(cached)) == 1 and cached[0] > 0  # each branch reuses the trunk
    elif name in AGENTS:  # the tiny model writes no well-formed call: one reply per turn
        turns = [line for line in lines if line.startswith("turn ")]
        assert {t.split()[1] for t in turns} == {"1", "2", "3"}
        cached = [int(t.split("cached ")[1].split(",")[0]) for t in turns]
        assert cached == sorted(set(cached)), cached  # one session
    else:
        assert sum("cached tokens per turn" in line for line in lines) == 4
