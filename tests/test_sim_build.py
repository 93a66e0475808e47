"""The optional mypyc build of the simulator (sim/build.py): loaded only when fresh; it changes no digit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dualpath_sdk.sim import fresh_build, stamp

# One small run of each mode, its figures printed as the CLI's table would show them, and where its
# event loop came from (a .so when compiled).
RUN = """
import json
from dualpath_sdk.sim import core
from dualpath_sdk.sim.runner import offline, online
from dualpath_sdk.sim.presets import PRESETS
p = PRESETS["ds27b-1p1d"]
runs = [offline(p, m, 24) for m in ("basic", "dualpath", "oracle")] + [online(p, "dualpath", 0.5, 120)]
for r in runs:
    del r["wall_s"], r["events_per_s"]
print(json.dumps({"core": core.__file__, "runs": runs}))
"""


def test_a_build_loads_only_while_its_stamp_matches_the_sources(tmp_path: Path) -> None:
    assert fresh_build(tmp_path) is None  # no build
    (tmp_path / "STAMP").write_text(stamp())
    assert fresh_build(tmp_path) == tmp_path
    (tmp_path / "STAMP").write_text(stamp()[:-1] + "x")  # made from other sources
    assert fresh_build(tmp_path) is None


@pytest.mark.skipif(fresh_build() is None, reason="no fresh mypyc build (python -m dualpath_sdk.sim.build)")
def test_compiled_runs_print_the_digits_of_pure_python() -> None:
    def run(pure: bool) -> dict[str, object]:
        env = {k: v for k, v in os.environ.items() if k != "DUALPATH_SIM_PURE"}
        if pure:
            env["DUALPATH_SIM_PURE"] = "1"
        root = Path(__file__).parents[1]
        out = subprocess.run(
            [sys.executable, "-c", RUN], env=env, cwd=root, capture_output=True, text=True, check=True
        )
        return json.loads(out.stdout)

    compiled, pure = run(False), run(True)
    assert str(compiled["core"]).endswith(".so") and str(pure["core"]).endswith(".py")
    assert compiled["runs"] == pure["runs"]
