"""`python -m dualpath_sdk.sim --preset NAME [--agents N,...] [--mode ...] [--out DIR]`.

Offline by default (JCT over agent counts); `--online` bisects capacity under the SLO instead. Writes
results.json and a plot to --out, prints a table, and ends with ONE line of JSON with the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from rich.console import Console
from rich.table import Table

from dualpath_sdk.config import Mode, SchedulerConfig
from dualpath_sdk.sim.presets import PRESETS
from dualpath_sdk.sim.runner import capacity, offline, online

MODES: tuple[Mode, ...] = ("basic", "dualpath", "oracle")
_ONLINE_KEYS = ("ttft_s", "ttft_p90_s", "read_s", "tpot_ms", "tpot_p90_ms")


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dualpath_sdk.sim", description=__doc__)
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--agents", default="256", help="comma-separated agent counts (offline)")
    p.add_argument("--mode", default="all", choices=("all", *MODES))
    p.add_argument("--workload", choices=("32K", "48K", "64K"), help="default: the preset's")
    p.add_argument("--pe-nodes", type=int, help="override the preset's prefill node count")
    p.add_argument("--de-nodes", type=int, help="override the preset's decode node count")
    p.add_argument("--scale", type=int, default=1, help="multiply nodes and agents by this")
    p.add_argument("--no-split", action="store_true", help="the paper's read rule (no split reads)")
    p.add_argument("--online", action="store_true", help="bisect online capacity instead")
    p.add_argument("--rate", type=float, help="online: measure at this agents/s instead of bisecting")
    p.add_argument("--rate-max", type=float, default=4.0, help="online: upper bound of agents/s")
    p.add_argument("--horizon", type=float, default=1200.0, help="online: seconds of arrivals")
    p.add_argument("--steps", type=int, default=6, help="online: bisection steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="sim-out")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = _args(argv)
    preset = PRESETS[a.preset]
    preset = replace(
        preset,
        pe_nodes=a.pe_nodes or preset.pe_nodes,
        de_nodes=a.de_nodes or preset.de_nodes,
        workload=a.workload or preset.workload,
    )
    if a.scale > 1:
        preset = preset.scaled(a.scale)
    config = SchedulerConfig(split_reads=not a.no_split)
    modes = MODES if a.mode == "all" else (a.mode,)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    console = Console(width=150)
    if a.online:
        if a.rate is not None:
            runs = [online(preset, m, a.rate * a.scale, a.horizon, a.seed, config) for m in modes]
            results = [
                {"preset": preset.name, "mode": r["mode"], "capacity": None, "runs": [r]} for r in runs
            ]
            figures: dict[str, Any] = {
                "preset": preset.name,
                "split": not a.no_split,
                "rate": a.rate * a.scale,
                "online": {r["mode"]: {k: r[k] for k in _ONLINE_KEYS} for r in runs},
            }
        else:
            results = [
                capacity(preset, m, 0.0, a.rate_max * a.scale, a.horizon, a.steps, a.seed, config)
                for m in modes
            ]
            figures = {
                "preset": preset.name,
                "split": not a.no_split,
                "online_capacity": {r["mode"]: r["capacity"] for r in results},
            }
        table = Table(title=f"{preset.name} online (agents/s; SLO: mean TTFT<=4s, mean TPOT<=50ms)")
        for col in ("mode", "capacity", "rate", *_ONLINE_KEYS, "within_slo", "read_share_de", "wall_s"):
            table.add_column(col)
        for r in results:
            for run in r["runs"]:
                table.add_row(
                    r["mode"],
                    str(r["capacity"]),
                    f"{run['rate']:.3f}",
                    *(str(run[k]) for k in _ONLINE_KEYS),
                    str(run["within_slo"]),
                    str(run["read_share_de"]),
                    str(run["wall_s"]),
                )
        _plot_online(results, out / "online.png")
    else:
        agents = [int(x) * a.scale for x in a.agents.split(",")]
        results = [offline(preset, m, n, a.seed, config) for n in agents for m in modes]
        figures = {
            "preset": preset.name,
            "workload": preset.workload,
            "split": not a.no_split,
            "jct_s": {m: [r["jct_s"] for r in results if r["mode"] == m] for m in modes},
            "agents": agents,
        }
        shape = f"{preset.workload}, {preset.pe_nodes}P{preset.de_nodes}D"
        table = Table(title=f"{preset.name} offline ({shape})")
        for col in (
            "mode",
            "agents",
            "jct_s",
            "ttft_s",
            "tpot_ms",
            "read_share_de",
            "snic_pe",
            "snic_de",
            "events/s",
        ):
            table.add_column(col)
        for r in results:
            table.add_row(
                r["mode"],
                str(r["agents"]),
                str(r["jct_s"]),
                str(r["ttft_s"]),
                str(r["tpot_ms"]),
                str(r["read_share_de"]),
                str(r["snic_util_pe"]),
                str(r["snic_util_de"]),
                str(r["events_per_s"]),
            )
        _plot_offline(results, modes, out / "offline.png")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    console.print(table)
    sys.stdout.write(json.dumps(figures) + "\n")
    return figures


def _plot_offline(results: list[dict[str, Any]], modes: tuple[Mode, ...], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in modes:
        rows = [r for r in results if r["mode"] == m]
        ax.plot([r["agents"] for r in rows], [r["jct_s"] for r in rows], marker="o", label=m)
    ax.set_xlabel("agents")
    ax.set_ylabel("JCT (s)")
    ax.set_title(results[0]["preset"])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_online(results: list[dict[str, Any]], path: Path) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 4))
    for r in results:
        runs = sorted(r["runs"], key=lambda x: x["rate"])
        ax1.plot([x["rate"] for x in runs], [x["ttft_s"] for x in runs], marker="o", label=r["mode"])
        ax2.plot([x["rate"] for x in runs], [x["tpot_ms"] for x in runs], marker="o", label=r["mode"])
    ax1.axhline(4.0, ls="--", c="grey")
    ax2.axhline(50.0, ls="--", c="grey")
    ax1.set(xlabel="agents/s", ylabel="mean TTFT (s)")
    ax2.set(xlabel="agents/s", ylabel="mean TPOT (ms)")
    ax1.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
