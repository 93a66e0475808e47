"""Discrete-event simulator of a PD-disaggregated cluster (docs/simulation.md).

When a mypyc build of its hot modules made from the current sources exists (`python -m
dualpath_sdk.sim.build`), they load from it ahead of their sources: the same results, ~1.8x faster.
DUALPATH_SIM_PURE=1 keeps them Python.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

_SIM = Path(__file__).resolve().parent
_PACKAGE = _SIM.parent
BUILD = _PACKAGE.parent / "build" / "sim-mypyc"
# The hot path of a run. Not compiled: ablation.py (its scheduler subclasses an interpreted class) and
# what runs once per run (presets, workload, runner, the CLI).
COMPILED = ("core", "engines", "cluster", "ranking", "candidates", "costs", "metrics", "store", "balance")
# The compiled code was type-checked against these too: a change in them also makes a build stale.
_CHECKED = ("config.py", "sim/presets.py", "sim/workload.py", "sim/ablation.py", "scheduler")


def stamp() -> str:
    """What a build is made from: the compiled sources, the modules they were checked against, the
    interpreter."""
    h = hashlib.sha256(sys.version.encode())
    paths = [_SIM / f"{m}.py" for m in COMPILED]
    for name in _CHECKED:
        p = _PACKAGE / name
        paths += sorted(p.glob("*.py")) if p.is_dir() else [p]
    for path in paths:
        h.update(str(path.relative_to(_PACKAGE)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def fresh_build(build: Path = BUILD) -> Path | None:
    """`build` when it holds a build made from the current sources, else None."""
    try:
        return build if (build / "STAMP").read_text() == stamp() else None
    except OSError:
        return None


def _load_compiled() -> None:
    if os.environ.get("DUALPATH_SIM_PURE"):
        return
    out = fresh_build()
    if out is None:
        return
    sys.path.append(str(out))  # the build's shared runtime module sits at its top
    __path__.insert(0, str(out / "dualpath_sdk" / "sim"))


_load_compiled()
