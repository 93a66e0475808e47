"""`python -m dualpath_sdk.sim.build` (`make sim-fast`): compile the simulator's hot modules with mypyc.

The event loop, links, engines and the request path run ~1.8x faster compiled (docs/simulation.md, Speed).
The extension modules go to build/sim-mypyc/ beside the package with a stamp of the sources they came
from; sim/__init__.py loads them only while the stamp matches, so an edited source runs as Python until
the next build. Compiled and pure runs print the same digits: the same float operations run in the same
order (tests/test_sim_open.py compares them).
"""

from __future__ import annotations

import os
import shutil
import tempfile

from dualpath_sdk.sim import BUILD, COMPILED, stamp


def main() -> None:
    from mypyc.build import mypycify  # only the build needs mypyc (it ships with mypy)
    from setuptools import setup

    made_from = stamp()
    root = BUILD.parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        # mypyc names a module after its path from the working directory: build from the repository root,
        # with the C sources and objects in tmp and the extension modules in a fresh BUILD.
        os.chdir(root)
        shutil.rmtree(BUILD, ignore_errors=True)
        setup(
            name="dualpath-sim-mypyc",
            ext_modules=mypycify([f"dualpath_sdk/sim/{m}.py" for m in COMPILED], target_dir=f"{tmp}/c"),
            script_args=["build_ext", "--build-lib", str(BUILD), "--build-temp", f"{tmp}/obj"],
        )
    (BUILD / "STAMP").write_text(made_from)
    print(f"compiled {len(COMPILED)} modules into {BUILD}")


if __name__ == "__main__":
    main()
