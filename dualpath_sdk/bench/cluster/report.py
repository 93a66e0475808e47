"""The cluster benchmark's report: its tables, the figures for the JSON line and the file, the plot."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dualpath_sdk.api.session import StepResult
from dualpath_sdk.bench.cluster.runs import SNIC_BPS, TOPOLOGIES, Run

RESULTS = Path("bench-results")  # under the working directory: the plot and the figures
PLOT, FIGURES = RESULTS / "cluster.png", RESULTS / "cluster.json"

Figures = dict[str, float | int | bool | str]


def _ttft_cells(runs: list[Run]) -> list[str]:
    def mean(pick: Callable[[StepResult], float]) -> str:
        return f"{statistics.fmean(r.mean(pick) for r in runs):.2f}"

    return [
        mean(lambda s: s.timings.ttft_s),
        mean(lambda s: s.timings.queue_s),
        mean(lambda s: s.timings.read_s),
        mean(lambda s: s.timings.prefill_s),
    ]


def _nic_cells(runs: list[Run]) -> list[str]:
    """PE and DE storage NICs: busiest 4 s window / mean over the runs (DE: over its nodes)."""
    cells = []
    for role in ("pe", "de"):
        nodes = [v for r in runs for node, v in r.nic.items() if node.startswith(role)]
        busy, mean = max(b for b, _ in nodes), statistics.fmean(m for _, m in nodes)
        cells.append(f"{busy:.0%} / {mean:.0%}")
    return cells


def _spread(values: list[float], digits: int, unit: str = "") -> str:
    """The median, with the min-max beside it when there are several rounds."""
    median = f"{statistics.median(values):.{digits}f}{unit}"
    return f"{median} ({min(values):.{digits}f}-{max(values):.{digits}f})" if len(values) > 1 else median


def speedups(runs: list[Run]) -> dict[tuple[str, str], list[float]]:
    """Each (topology, row)'s JCT speed-up over basic, one per round: against that round's basic run."""
    basic = {(r.topology, r.repeat): r.jct_s for r in runs if r.row == "basic"}
    out: dict[tuple[str, str], list[float]] = {}
    for r in runs:
        out.setdefault((r.topology, r.row), []).append(basic[r.topology, r.repeat] / r.jct_s)
    return out


MARGIN = 0.02  # speed-ups closer than this (relative) are the same: the basic rows alone vary ~0.5%


def verdict(one_side: list[float], split: list[float]) -> str:
    """Split against one side: a difference is called only where it exceeds MARGIN and every round
    says the same (the two rows' ranges do not overlap)."""
    if len(split) < 2:
        return "one round: undecided"
    if abs(statistics.median(split) / statistics.median(one_side) - 1) < MARGIN:
        return f"equal within {MARGIN:.0%}"
    if min(split) > max(one_side):
        return "split faster"
    if min(one_side) > max(split):
        return "one side faster"
    return "within the spread"


def offline_table(console: Console, title: str, runs: list[Run]) -> Figures:
    """One row per (topology, mode): medians over the rounds, with each figure's min-max beside it."""
    figures: Figures = {}
    groups: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        groups.setdefault((r.topology, r.row), []).append(r)
    ratios = speedups(runs)
    rounds = max(r.repeat for r in runs) + 1
    table = Table(title=f"{title}, {rounds} round{'s' if rounds > 1 else ''}: medians (min-max)")
    columns = ("nodes", "mode", "JCT s", "x basic", "ideal", "cached", "TTFT s", "queue", "read", "prefill")
    for column in (*columns, "PE SNIC", "DE SNIC"):  # read use of the cap: busiest 4 s / mean
        table.add_column(column, justify="right")
    for (topology, row), group in groups.items():
        p, d = TOPOLOGIES[topology]
        jct, speedup = [r.jct_s for r in group], ratios[topology, row]
        ideal = f"{(p + d) / p:.1f}x" if row.startswith("dualpath") else ""  # oracle is compute-bound
        share = statistics.fmean(cached_share(r) for r in group)
        cells = (
            _spread(jct, 1),
            _spread(speedup, 2, "x"),
            ideal,
            f"{share:.3f}",
            *_ttft_cells(group),
            *_nic_cells(group),
        )
        table.add_row(topology, row, *cells)
        key = f"{title.split()[0]}_{topology}_{row}"
        figures[f"{key}_jct_s"] = round(statistics.median(jct), 2)
        figures[f"{key}_vs_basic"] = round(statistics.median(speedup), 3)
        if len(group) > 1:
            figures[f"{key}_jct_min_s"], figures[f"{key}_jct_max_s"] = round(min(jct), 2), round(max(jct), 2)
            figures[f"{key}_vs_basic_min"] = round(min(speedup), 3)
            figures[f"{key}_vs_basic_max"] = round(max(speedup), 3)
        ttft = statistics.fmean(r.mean(lambda s: s.timings.ttft_s) for r in group)
        figures[f"{key}_ttft_s"] = round(ttft, 3)
        figures[f"{key}_cached_share"] = round(share, 4)
        for node in group[0].nic:
            figures[f"{key}_{node}_nic_mean"] = round(statistics.fmean(r.nic[node][1] for r in group), 3)
    console.print(table)
    console.print(
        "cached: share of prompt tokens loaded, not computed; TTFT = queue + read + prefill (means, s); "
        "SNIC: read use of the cap, busiest 4 s / mean; x basic: against the same round's basic run"
    )
    figures |= _verdicts(console, title, ratios)
    return figures


def _verdicts(console: Console, title: str, ratios: dict[tuple[str, str], list[float]]) -> Figures:
    """Whether the oracle stayed well above the ideal (storage bound every row) and split against one side."""
    figures: Figures = {}
    for topology, (p, d) in TOPOLOGIES.items():
        key = f"{title.split()[0]}_{topology}"
        if (topology, "oracle") in ratios:
            margin = min(ratios[topology, "oracle"]) / ((p + d) / p)
            figures[f"{key}_oracle_over_ideal"] = round(margin, 2)
            console.print(f"{topology}: slowest oracle round at {margin:.2f}x the ideal dualpath speed-up")
        if (topology, "dualpath") in ratios and (topology, "dualpath+split") in ratios:
            said = verdict(ratios[topology, "dualpath"], ratios[topology, "dualpath+split"])
            figures[f"{key}_split_vs_one_side"] = said
            console.print(f"{topology}: dualpath+split against dualpath (one side per request): {said}")
    return figures


def cached_share(r: Run) -> float:
    """Prompt tokens whose KV was loaded over all prompt tokens: a continued session reloads every
    history token but the last one sampled (Full Blocks and the partial block after them)."""
    prompt = sum(s.result.usage.prompt_tokens for s in r.steps)
    return sum(s.result.usage.cached_tokens for s in r.steps) / prompt if prompt else 0.0


def outputs_agree(runs: list[Run]) -> bool:
    exact = [r.outputs for r in runs if r.row != "oracle"]
    return all(o == exact[0] for o in exact[1:])


def plot(path: Path, runs: list[Run]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    topologies = list(dict.fromkeys(r.topology for r in runs))
    rows = list(dict.fromkeys(r.row for r in runs))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        xs = [t + (i - (len(rows) - 1) / 2) * width for t in range(len(topologies))]
        jcts = [[r.jct_s for r in runs if r.topology == t and r.row == row] or [0.0] for t in topologies]
        mid = [statistics.median(j) for j in jcts]
        spread = [[m - min(j), max(j) - m] for m, j in zip(mid, jcts, strict=True)]
        ax.bar(xs, mid, width, yerr=list(zip(*spread, strict=True)), capsize=3, label=row)
    ax.set_xticks(range(len(topologies)), topologies)
    ax.set_ylabel("job completion time (s), median and min-max")
    ax.set_title(f"offline agents, storage NIC capped at {SNIC_BPS / 1e6:.0f} MB/s per node")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def latency_table(console: Console, title: str, runs: list[Run]) -> Figures:
    figures: Figures = {}
    table = Table(title=title)
    for column in ("load", "mode", "steps", "TTFT p50", "p90", "p99", "read mean", "TPOT p50", "p90"):
        table.add_column(column, justify="right")
    for r in runs:
        ttft = [r.percentile(lambda s: s.timings.ttft_s, q) for q in (0.5, 0.9, 0.99)]
        tpot = [r.percentile(lambda s: s.timings.tpot_s, q) for q in (0.5, 0.9)]
        read = r.mean(lambda s: s.timings.read_s)
        table.add_row(
            r.topology,
            r.row,
            str(len(r.steps)),
            *(f"{v:.2f}" for v in ttft),
            f"{read:.2f}",
            *(f"{v * 1e3:.0f} ms" for v in tpot),
        )
        key = f"online_{r.topology}_{r.row}"
        figures[f"{key}_ttft_p50_s"] = round(ttft[0], 3)
        figures[f"{key}_ttft_p90_s"] = round(ttft[1], 3)
        figures[f"{key}_tpot_p50_ms"] = round(tpot[0] * 1e3, 1)
    console.print(table)
    return figures


def saved(figures: Figures, path: Path = FIGURES) -> Figures:
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(figures, indent=1, sort_keys=True) + "\n")
    Console().print(f"figures: {path}")
    return figures
