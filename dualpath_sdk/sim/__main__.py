"""`python -m dualpath_sdk.sim --preset NAME [--agents N,...] [--mode ...] [--out DIR]`.

Offline by default (JCT over agent counts); `--online` bisects capacity under the SLO instead. Writes
results.json and a plot to --out, prints a table, and ends with ONE line of JSON with the figures.
`--ablation` runs the paper's ablation steps in place of the modes; `--tool-latency` and `--storage-gb`
take comma-separated lists and run every combination; `--balance` adds the load-balance figures.
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
from dualpath_sdk.sim.ablation import STEPS
from dualpath_sdk.sim.cluster import Options
from dualpath_sdk.sim.presets import PRESETS, Preset
from dualpath_sdk.sim.runner import capacity, offline, online

MODES: tuple[Mode, ...] = ("basic", "dualpath", "oracle")
_ONLINE_KEYS = ("ttft_s", "ttft_p90_s", "read_s", "tpot_ms", "tpot_p90_ms")
_DETAIL_KEYS = ("wait_s", "alloc_s", "prefill_s", "ttst_ms")
# Columns a run has only when a flag asked for them (a plain run's table is as it always was).
_EXTRA_KEYS = (
    "tool_latency_s",
    "storage_gb",
    "pin_ttl_s",
    "ws_peak_gb",
    "ws_mean_gb",
    "hit_rate",
    "recompute_share",
    "evicted_gb",
    "write_failed_gb",
    "snic_max_avg",
    "snic_max_avg_p90",
    "attention_max_avg",
    "attention_max_avg_p90",
)


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dualpath_sdk.sim", description=__doc__)
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--agents", default="256", help="comma-separated agent counts (offline)")
    p.add_argument("--mode", default="all", choices=("all", *MODES))
    p.add_argument("--workload", choices=("32K", "48K", "64K"), help="default: the preset's")
    p.add_argument("--append", type=int, help="mean appended tokens per call (default: the workload's)")
    p.add_argument("--gen", type=int, help="mean generated tokens per call (default: the workload's)")
    p.add_argument("--tflops", type=float, help="assumed effective prefill TFLOP/s per GPU (sensitivity)")
    p.add_argument("--decode-overhead-ms", type=float, help="assumed decode step overhead (sensitivity)")
    p.add_argument("--kv-kib", type=float, help="KV bytes per token, in KiB (sensitivity)")
    p.add_argument("--active-b", type=float, help="active parameters, billions (sensitivity)")
    p.add_argument("--pe-nodes", type=int, help="override the preset's prefill node count")
    p.add_argument("--de-nodes", type=int, help="override the preset's decode node count")
    p.add_argument("--scale", type=int, default=1, help="multiply nodes and agents by this")
    p.add_argument("--no-split", action="store_true", help="the paper's read rule (no split reads)")
    p.add_argument("--online", action="store_true", help="bisect online capacity instead")
    p.add_argument("--rate", type=float, help="online: measure at this agents/s instead of bisecting")
    p.add_argument("--rate-max", type=float, default=4.0, help="online: upper bound of agents/s")
    p.add_argument("--horizon", type=float, default=1200.0, help="online: seconds of arrivals")
    p.add_argument("--steps", type=int, default=6, help="online: bisection steps")
    p.add_argument("--ablation", action="store_true", help="offline: the paper's ablation steps, not modes")
    p.add_argument("--tool-latency", help="seconds between a call's end and the next call; comma-separated")
    p.add_argument("--storage-gb", help="KV storage capacity (GB); comma-separated; default unbounded")
    p.add_argument(
        "--pin-ttl", type=float, default=3600.0, help="session pin TTL (s) with --storage-gb; 0: none"
    )
    p.add_argument("--detail", action="store_true", help="online: TTFT in its parts, and TTST")
    p.add_argument("--balance", type=float, default=0.0, help="load-balance figures over windows of this (s)")
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
        append=a.append,
        gen=a.gen,
    )
    preset = _assumed(preset, a)
    if a.scale > 1:
        preset = preset.scaled(a.scale)
    config = SchedulerConfig(split_reads=not a.no_split)
    modes = MODES if a.mode == "all" else (a.mode,)
    variants = _variants(a, preset)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    console = Console(width=150)
    if a.online:
        if a.rate is not None:
            runs = [
                _tagged(online(preset, m, a.rate * a.scale, a.horizon, a.seed, config, o), tag)
                for tag, o in variants
                for m in modes
            ]
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
                _tagged(
                    capacity(preset, m, 0.0, a.rate_max * a.scale, a.horizon, a.steps, a.seed, config, o), tag
                )
                for tag, o in variants
                for m in modes
            ]
            figures = {
                "preset": preset.name,
                "split": not a.no_split,
                "online_capacity": {r["mode"]: r["capacity"] for r in results},
            }
        table = Table(title=f"{preset.name} online (agents/s; SLO: mean TTFT<=4s, mean TPOT<=50ms)")
        extra = [*_DETAIL_KEYS] * a.detail + _extra_keys([run for r in results for run in r["runs"]])
        for col in (
            "mode",
            "capacity",
            "rate",
            *_ONLINE_KEYS,
            *extra,
            "within_slo",
            "read_share_de",
            "wall_s",
        ):
            table.add_column(col)
        for r in results:
            for run in r["runs"]:
                table.add_row(
                    r["mode"],
                    str(r["capacity"]),
                    f"{run['rate']:.3f}",
                    *(str(run[k]) for k in _ONLINE_KEYS),
                    *(str(run.get(k)) for k in extra),
                    str(run["within_slo"]),
                    str(run["read_share_de"]),
                    str(run["wall_s"]),
                )
        _plot_online(results, out / "online.png")
    else:
        agents = [int(x) * a.scale for x in a.agents.split(",")]
        if a.ablation:
            results = [
                _tagged(offline(preset, "dualpath", n, a.seed, config, replace(o, features=f), step), tag)
                for n in agents
                for tag, o in variants
                for step, f in STEPS.items()
            ]
        else:
            results = [
                _tagged(offline(preset, m, n, a.seed, config, o), tag)
                for n in agents
                for tag, o in variants
                for m in modes
            ]
        labels = list(dict.fromkeys(r["mode"] for r in results))
        figures = {
            "preset": preset.name,
            "workload": preset.workload,
            "split": not a.no_split,
            "jct_s": {m: [r["jct_s"] for r in results if r["mode"] == m] for m in labels},
            "agents": agents,
        }
        shape = f"{preset.workload}, {preset.pe_nodes}P{preset.de_nodes}D"
        shape += f", append {preset.append}" * (preset.append is not None)
        shape += f", gen {preset.gen}" * (preset.gen is not None)
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
            *_extra_keys(results),
            "events/s",
        ):
            table.add_column(col)
        extra = _extra_keys(results)
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
                *(str(r.get(k)) for k in extra),
                str(r["events_per_s"]),
            )
        _plot_offline(results, labels, out / "offline.png")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    console.print(table)
    sys.stdout.write(json.dumps(figures) + "\n")
    return figures


def _assumed(preset: Preset, a: argparse.Namespace) -> Preset:
    """The preset with the assumed figures the flags set (presets.py marks them)."""
    model, hw = preset.model, preset.hardware
    if a.decode_overhead_ms is not None:
        model = replace(model, decode_overhead_s=a.decode_overhead_ms / 1e3)
    if a.kv_kib is not None:
        model = replace(model, kv_bytes_per_token=int(a.kv_kib * 1024))
    if a.active_b is not None:
        model = replace(model, active_params=a.active_b * 1e9)
    if a.tflops is not None:
        hw = replace(hw, gpu_flops=a.tflops * 1e12)
    return replace(preset, model=model, hardware=hw)


def _variants(a: argparse.Namespace, preset: Preset) -> list[tuple[str, Options]]:
    """(tag, Options) per combination of --tool-latency and --storage-gb; one untagged run without them."""
    latencies = [float(x) for x in a.tool_latency.split(",")] if a.tool_latency else [None]
    sizes = [float(x) for x in a.storage_gb.split(",")] if a.storage_gb else [None]
    block_bytes = 64 * preset.model.kv_bytes_per_token
    out = []
    for lat in latencies:
        for gb in sizes:
            parts = [] if lat is None else [f"L={lat:g}s"]
            parts += [] if gb is None else [f"S={gb:g}GB pins={a.pin_ttl:g}s"]
            tag = " ".join(parts)
            o = Options(
                tool_latency_s=lat or 0.0,
                storage_blocks=None if gb is None else int(gb * 1e9 // block_bytes),
                pin_ttl_s=a.pin_ttl,
                working_set=lat is not None or gb is not None,
                sample_s=a.balance,
            )
            out.append((tag, o))
    return out


def _tagged(result: dict[str, Any], tag: str) -> dict[str, Any]:
    """Name the variant in the run's mode label, and record what it set."""
    if tag:
        result["mode"] = f"{result['mode']} {tag}"
    return result


def _extra_keys(results: list[dict[str, Any]]) -> list[str]:
    return [k for k in _EXTRA_KEYS if any(k in r for r in results)]


def _plot_offline(results: list[dict[str, Any]], modes: list[str], path: Path) -> None:
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
