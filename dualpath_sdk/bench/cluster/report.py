"""The cluster benchmark's report: its tables, the figures for the JSON line and the file, the plot."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dualpath_sdk.bench.cluster.runs import SNIC_BPS, TOPOLOGIES, Run

RESULTS = Path("bench-results")  # under the working directory: the plot and the figures
PLOT, FIGURES = RESULTS / "cluster.png", RESULTS / "cluster.json"

Figures = dict[str, float | int | bool | str]


def _ttft_cells(r: Run) -> list[str]:
    return [
        f"{r.mean(lambda s: s.timings.ttft_s):.2f}",
        f"{r.mean(lambda s: s.timings.queue_s):.2f}",
        f"{r.mean(lambda s: s.timings.read_s):.2f}",
        f"{r.mean(lambda s: s.timings.prefill_s):.2f}",
    ]


def _nic_cells(r: Run) -> list[str]:
    """PE and DE storage NICs: busiest 4 s window / mean over the run (DE: over its nodes)."""
    cells = []
    for role in ("pe", "de"):
        nodes = [v for node, v in r.nic.items() if node.startswith(role)]
        busy, mean = max(b for b, _ in nodes), statistics.fmean(m for _, m in nodes)
        cells.append(f"{busy:.0%} / {mean:.0%}")
    return cells


def offline_table(console: Console, title: str, runs: list[Run]) -> Figures:
    figures: Figures = {}
    basic = {r.topology: r.jct_s for r in runs if r.row == "basic"}
    table = Table(title=title)
    columns = ("nodes", "mode", "JCT s", "x basic", "ideal", "cached", "TTFT s", "queue", "read", "prefill")
    for column in (*columns, "PE SNIC", "DE SNIC"):  # read use of the cap: busiest 4 s / mean
        table.add_column(column, justify="right")
    for r in runs:
        p, d = TOPOLOGIES[r.topology]
        speedup = basic[r.topology] / r.jct_s
        ideal = f"{(p + d) / p:.1f}x" if r.row.startswith("dualpath") else ""  # oracle is compute-bound
        share = cached_share(r)
        cells = (f"{r.jct_s:.1f}", f"{speedup:.2f}x", ideal, f"{share:.3f}", *_ttft_cells(r), *_nic_cells(r))
        table.add_row(r.topology, r.row, *cells)
        key = f"{title.split()[0]}_{r.topology}_{r.row}"
        figures[f"{key}_jct_s"] = round(r.jct_s, 2)
        figures[f"{key}_vs_basic"] = round(speedup, 3)
        figures[f"{key}_ttft_s"] = round(r.mean(lambda s: s.timings.ttft_s), 3)
        figures[f"{key}_cached_share"] = round(share, 4)
        for node, (_, mean) in r.nic.items():
            figures[f"{key}_{node}_nic_mean"] = round(mean, 3)
    console.print(table)
    console.print(
        "cached: share of prompt tokens loaded, not computed; TTFT = queue + read + prefill (means, s); "
        "SNIC: read use of the cap, busiest 4 s / mean"
    )
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
        jct = [next((r.jct_s for r in runs if r.topology == t and r.row == row), 0.0) for t in topologies]
        ax.bar(xs, jct, width, label=row)
    ax.set_xticks(range(len(topologies)), topologies)
    ax.set_ylabel("job completion time (s)")
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


def saved(figures: Figures) -> Figures:
    FIGURES.parent.mkdir(exist_ok=True)
    FIGURES.write_text(json.dumps(figures, indent=1, sort_keys=True) + "\n")
    Console().print(f"figures: {FIGURES}")
    return figures
