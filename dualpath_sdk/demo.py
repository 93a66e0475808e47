"""`dualpath demo`: concurrent coding-agent sessions on the embedded cluster, then the same final
prompts prefilled cold, to show what reloading each session's KV-Cache saves.

The conversation is scripted: every session gets a task, then tool results of realistic size (a
source file, pytest logs, diffs) as `tool` messages, turn after turn, whatever the model replies (a
135M model rarely calls the tools it is offered; when it does, the result answers its call's id).
The cold baseline steps each session's final prompt as raw token ids in a fresh session of another
tenant, which shares no KV block with the first; the baselines run side by side, as the sessions'
last turns did, so both sides of the comparison share the machine alike.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.abc
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from dualpath_sdk.api.cluster import Cluster
from dualpath_sdk.api.result import StepResult
from dualpath_sdk.api.session import Session
from dualpath_sdk.config import ReadPlanChoice, StoreConfig
from dualpath_sdk.errors import DualPathError
from dualpath_sdk.store.admin import StoreAdmin

PlanOption = ReadPlanChoice | Literal["rotate"]
ROTATION = ("pe", "de", "split")
TENANT = "demo"
COLD_TENANT = "demo-cold"  # another tenant: another key namespace, so no block is shared

SYSTEM = (
    "You are a coding agent working in a Python repository. Use the tools to inspect files, run the "
    "tests and apply patches. Keep changes minimal and explain each step in one sentence."
)


def _tool(name: str, description: str, **params: str) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {p: {"type": "string", "description": d} for p, d in params.items()},
                "required": list(params),
            },
        },
    }


TOOLS = [
    _tool("read_file", "Read a file.", path="from the repository root"),
    _tool("run_tests", "Run pytest.", path="test file or directory"),
    _tool("search_code", "grep -rnE in the repository.", pattern="a regex"),
    _tool("apply_patch", "Apply a unified diff.", patch="the diff"),
    _tool("git_diff", "Show uncommitted changes.", path="'.' for all"),
]

TASKS = [
    "CI on main has been red since the billing refactor (#482): tests/test_invoice.py fails. Find "
    "out why and fix billing/invoice.py without changing its public API.",
    "Customer report: an invoice with the SPRING10 coupon came out 6.25 short, and a coupon stopped "
    "working on its last valid day. Reproduce it with the test suite and fix billing/invoice.py.",
    "Before we tag release 2.3 the test suite has to be green. Look at the failing billing tests, "
    "fix the code (not the tests) and summarise the change for the changelog.",
]

INVOICE_PY = '''"""Invoices: line items, a coupon, tax and totals (Decimal amounts, rounded to cents)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date
from decimal import ROUND_HALF_UP, Decimal

CENT = Decimal("0.01")


@dataclass(frozen=True)
class Coupon:
    code: str
    percent: Decimal
    expires: date  # the last day the coupon is valid

    def valid_on(self, day: date) -> bool:
        return day < self.expires


@dataclass
class LineItem:
    sku: str
    unit_price: Decimal
    quantity: int = 1

    @property
    def subtotal(self) -> Decimal:
        return self.unit_price * self.quantity


@dataclass
class Invoice:
    items: list[LineItem] = field(default_factory=list)
    tax_rate: Decimal = Decimal("0.08")
    coupon: Coupon | None = None

    def add(self, sku: str, unit_price: str, quantity: int = 1) -> None:
        if quantity <= 0:
            raise ValueError(f"quantity must be positive, got {quantity}")
        self.items.append(LineItem(sku, Decimal(unit_price), quantity))

    def subtotal(self) -> Decimal:
        return sum((item.subtotal for item in self.items), Decimal(0))

    def discount(self, day: date) -> Decimal:
        if self.coupon is None or not self.coupon.valid_on(day):
            return Decimal(0)
        return self.subtotal() * self.coupon.percent / 100

    def tax(self, day: date) -> Decimal:
        taxable = self.subtotal() - self.discount(day)
        return round(taxable * self.tax_rate, 2)

    def total(self, day: date) -> Decimal:
        net = self.subtotal() - self.discount(day)
        net -= self.discount(day)
        return (net + self.tax(day)).quantize(CENT, rounding=ROUND_HALF_UP)
'''

PYTEST_3_FAILED = """$ python -m pytest -q --tb=short tests/test_invoice.py
..F.F..F.                                                                [100%]
=================================== FAILURES ===================================
_______________________ test_coupon_valid_on_expiry_day ________________________
tests/test_invoice.py:41: in test_coupon_valid_on_expiry_day
    assert coupon.valid_on(date(2024, 3, 31))
E   AssertionError: assert False
E    +  where False = <bound method Coupon.valid_on of Coupon(code='SPRING10', ...)>(date(2024, 3, 31))
___________________________ test_tax_rounds_half_up ____________________________
tests/test_invoice.py:58: in test_tax_rounds_half_up
    assert inv.tax(date(2024, 1, 2)) == Decimal("0.03")
E   AssertionError: assert Decimal('0.02') == Decimal('0.03')
____________________________ test_total_with_coupon ____________________________
tests/test_invoice.py:67: in test_total_with_coupon
    assert inv.total(date(2024, 3, 1)) == Decimal("60.75")
E   AssertionError: assert Decimal('54.50') == Decimal('60.75')
=========================== short test summary info ============================
FAILED tests/test_invoice.py::test_coupon_valid_on_expiry_day - AssertionError: assert False
FAILED tests/test_invoice.py::test_tax_rounds_half_up - AssertionError: assert Decimal('0.02') == ...
FAILED tests/test_invoice.py::test_total_with_coupon - AssertionError: assert Decimal('54.50') == D...
3 failed, 6 passed in 0.21s"""

SEARCH_HITS = """$ grep -rnE "def (valid_on|tax|total)|[.]total[(]" billing
billing/invoice.py:18:    def valid_on(self, day: date) -> bool:
billing/invoice.py:51:    def tax(self, day: date) -> Decimal:
billing/invoice.py:55:    def total(self, day: date) -> Decimal:
billing/reports.py:112:        rows.append((inv.number, inv.total(day), inv.tax(day)))"""

PATCH_1 = """Applied 2 hunks to billing/invoice.py.
--- a/billing/invoice.py
+++ b/billing/invoice.py
@@ -18,3 +18,3 @@ class Coupon:
     def valid_on(self, day: date) -> bool:
-        return day < self.expires
+        return day <= self.expires
@@ -55,4 +55,3 @@ class Invoice:
     def total(self, day: date) -> Decimal:
         net = self.subtotal() - self.discount(day)
-        net -= self.discount(day)
         return (net + self.tax(day)).quantize(CENT, rounding=ROUND_HALF_UP)"""

PYTEST_1_FAILED = """$ python -m pytest -q --tb=short tests/test_invoice.py
....F....                                                                [100%]
=================================== FAILURES ===================================
___________________________ test_tax_rounds_half_up ____________________________
tests/test_invoice.py:58: in test_tax_rounds_half_up
    assert inv.tax(date(2024, 1, 2)) == Decimal("0.03")
E   AssertionError: assert Decimal('0.02') == Decimal('0.03')
=========================== short test summary info ============================
FAILED tests/test_invoice.py::test_tax_rounds_half_up - AssertionError: assert Decimal('0.02') == ...
1 failed, 8 passed in 0.19s"""

TEST_EXCERPT = """    54	def test_tax_rounds_half_up():
    55	    # 0.50 * 5% = 0.025: receipts round half up, to 0.03 (Python's round() gives 0.02)
    56	    inv = Invoice(tax_rate=Decimal("0.05"))
    57	    inv.add("PEN-01", "0.50")
    58	    assert inv.tax(date(2024, 1, 2)) == Decimal("0.03")"""

PATCH_2 = """Applied 1 hunk to billing/invoice.py.
--- a/billing/invoice.py
+++ b/billing/invoice.py
@@ -51,3 +51,3 @@ class Invoice:
     def tax(self, day: date) -> Decimal:
         taxable = self.subtotal() - self.discount(day)
-        return round(taxable * self.tax_rate, 2)
+        return (taxable * self.tax_rate).quantize(CENT, rounding=ROUND_HALF_UP)"""

PYTEST_PASSED = """$ python -m pytest -q tests
...............................................                          [100%]
47 passed in 0.64s"""

GIT_DIFF = """diff --git a/billing/invoice.py b/billing/invoice.py
index 3f2a9c1..8d0e4b7 100644
--- a/billing/invoice.py
+++ b/billing/invoice.py
@@ -18,3 +18,3 @@ class Coupon:
     def valid_on(self, day: date) -> bool:
-        return day < self.expires
+        return day <= self.expires
@@ -51,9 +51,8 @@ class Invoice:
     def tax(self, day: date) -> Decimal:
         taxable = self.subtotal() - self.discount(day)
-        return round(taxable * self.tax_rate, 2)
+        return (taxable * self.tax_rate).quantize(CENT, rounding=ROUND_HALF_UP)

     def total(self, day: date) -> Decimal:
         net = self.subtotal() - self.discount(day)
-        net -= self.discount(day)
         return (net + self.tax(day)).quantize(CENT, rounding=ROUND_HALF_UP)"""


@dataclass(frozen=True)
class ScriptTurn:
    """One turn after the task: what a tool returned (`tool` set), or a user message."""

    content: str
    tool: str | None = None


SCRIPT = [
    ScriptTurn(PYTEST_3_FAILED, "run_tests"),
    ScriptTurn(SEARCH_HITS, "search_code"),
    ScriptTurn(INVOICE_PY, "read_file"),
    ScriptTurn(PATCH_1, "apply_patch"),
    ScriptTurn(PYTEST_1_FAILED, "run_tests"),
    ScriptTurn(TEST_EXCERPT, "read_file"),
    ScriptTurn(PATCH_2, "apply_patch"),
    ScriptTurn(PYTEST_PASSED, "run_tests"),
    ScriptTurn(GIT_DIFF, "git_diff"),
    ScriptTurn("All green. Write the commit message for this change: a subject line and two bullets."),
]
MAX_TURNS = 1 + len(SCRIPT)  # the task, then the script


def turn_messages(session: int, turn: int, previous: StepResult | None) -> list[dict[str, Any]]:
    """Turn `turn` of session `session` as messages: the task first, then the scripted results.
    A tool result answers the model's first tool call when it made one, else a scripted call id."""
    if turn == 0:
        task = f"{TASKS[session % len(TASKS)]} (ticket DEV-{1401 + session})"
        return [{"role": "user", "content": task}]
    step = SCRIPT[turn - 1]
    if step.tool is None:
        return [{"role": "user", "content": step.content}]
    calls = previous.tool_calls if previous is not None else []
    call_id = str(calls[0]["id"]) if calls else f"call_s{session}t{turn}"
    return [{"role": "tool", "tool_call_id": call_id, "name": step.tool, "content": step.content}]


@dataclass(frozen=True)
class DemoOptions:
    sessions: int = 3
    turns: int = 8
    max_tokens: int = 24
    storage: Path | None = None  # None: a temporary directory, removed at the end
    read_plan: PlanOption = "auto"
    temperature: float = 0.0
    seed: int = 0
    model: str | None = None  # None: the default model


@dataclass(frozen=True)
class TurnRecord:
    session: int
    turn: int
    result: StepResult


@dataclass(frozen=True)
class SessionSummary:
    label: str
    session_id: str
    final_prompt: int  # tokens of the last turn's prompt
    final_cached: int
    reused_ttft_s: float  # the last turn's, its KV loaded from the store
    cold_ttft_s: float  # the same prompt prefilled from scratch
    cold_cached: int  # 0: the cold run really recomputed everything

    @property
    def ratio(self) -> float:
        return self.cold_ttft_s / self.reused_ttft_s if self.reused_ttft_s > 0 else float("inf")


@dataclass
class DemoSummary:
    sessions: list[SessionSummary] = field(default_factory=list)
    turns: list[TurnRecord] = field(default_factory=list)
    start_s: float = 0.0
    run_s: float = 0.0
    cold_s: float = 0.0

    @property
    def prompt_tokens(self) -> int:
        return sum(t.result.usage.prompt_tokens for t in self.turns)

    @property
    def cached_tokens(self) -> int:
        return sum(t.result.usage.cached_tokens for t in self.turns)

    @property
    def bytes_pe(self) -> int:
        return sum(t.result.load.bytes_pe for t in self.turns)

    @property
    def bytes_de(self) -> int:
        return sum(t.result.load.bytes_de for t in self.turns)


def run_demo(options: DemoOptions, console: Console) -> DemoSummary:
    """Start the cluster, run the sessions concurrently under a live table, prefill their final
    prompts cold, print the comparison; returns the figures."""
    summary = DemoSummary()
    storage = options.storage or Path(tempfile.mkdtemp(prefix="dualpath-demo-"))
    console.print(f"store: {storage}" + ("" if options.storage else " (temporary)"))
    try:
        t0 = time.perf_counter()
        cluster = _start(options, storage, console)
        summary.start_s = time.perf_counter() - t0
        with cluster:
            sessions = [cluster.session(system=SYSTEM, tenant=TENANT) for _ in range(options.sessions)]
            t0 = time.perf_counter()
            _run_sessions(options, sessions, summary, console)
            summary.run_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            cold_ids = _cold_baseline(cluster, sessions, summary, console)
            summary.cold_s = time.perf_counter() - t0
        if options.storage is not None:
            _forget(storage, cold_ids, console)
        _print_summary(summary, options, storage, console)
    finally:
        if options.storage is None:
            shutil.rmtree(storage, ignore_errors=True)
    return summary


def _forget(storage: Path, session_ids: list[str], console: Console) -> None:
    """Delete the cold baseline's sessions and blocks from a store that is kept: they are no
    sessions of the demo's."""
    try:
        with StoreAdmin(StoreConfig(root=storage)) as admin:
            for sid in session_ids:
                admin.delete(sid, blocks=True)
    except DualPathError as exc:
        console.print(f"[yellow]could not remove the cold baseline's sessions {session_ids}:[/] {exc}")


def _start(options: DemoOptions, storage: Path, console: Console) -> Cluster:
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        model = options.model
        if model is None:
            from dualpath_sdk.model.loader import default_model_dir

            task = progress.add_task(
                "Default model (SmolLM2-135M-Instruct; converted from GGUF on first use)"
            )
            model = str(default_model_dir())
            progress.update(task, completed=1, total=1)
        task = progress.add_task("Starting the engines (1 prefill + 1 decode process)")
        cluster = Cluster.local(model=model, storage=StoreConfig(root=storage))
        progress.update(task, completed=1, total=1)
    return cluster


def _step_options(options: DemoOptions, session: int, turn: int) -> dict[str, Any]:
    plan: str = options.read_plan
    if plan == "rotate":
        plan = ROTATION[(turn + session) % len(ROTATION)]
    step: dict[str, Any] = {
        "max_tokens": options.max_tokens,
        "temperature": options.temperature,
        "read_plan": plan,
        "tools": TOOLS,
    }
    if options.temperature > 0:
        step["seed"] = options.seed + session
    return step


def _run_sessions(
    options: DemoOptions, sessions: list[Session], summary: DemoSummary, console: Console
) -> None:
    total = len(sessions) * options.turns
    started = time.perf_counter()

    def render() -> RenderableType:
        done = len(summary.turns)
        elapsed = time.perf_counter() - started
        status = Text(f"{done}/{total} turns, {elapsed:.0f} s", style="dim")
        return Group(_turn_table(summary.turns, console.width), status)

    async def converse(i: int) -> None:
        previous: StepResult | None = None
        for turn in range(options.turns):
            messages = turn_messages(i, turn, previous)
            previous = await sessions[i].astep(messages, **_step_options(options, i, turn))
            summary.turns.append(TurnRecord(i, turn, previous))
            live.refresh()

    console.print(
        f"[bold]{len(sessions)} agent sessions x {options.turns} turns[/], concurrently "
        f"(max_tokens {options.max_tokens}, read plan {options.read_plan}):"
    )
    try:
        with Live(get_renderable=render, console=console, refresh_per_second=2) as live:
            _concurrently([partial(converse, i) for i in range(len(sessions))])
    finally:
        if not console.is_terminal:
            console.line()  # rich ends a live display's last line only on a terminal


def _concurrently(jobs: list[Callable[[], Awaitable[None]]]) -> None:
    """Run `jobs` side by side; the first failure cancels the others and is raised as itself."""
    errors: list[Exception] = []

    async def guarded(job: Callable[[], Awaitable[None]], group: anyio.abc.TaskGroup) -> None:
        try:
            await job()
        except Exception as exc:
            errors.append(exc)
            group.cancel_scope.cancel()

    async def main() -> None:
        async with anyio.create_task_group() as group:
            for job in jobs:
                group.start_soon(guarded, job, group)

    anyio.run(main)
    if errors:
        raise errors[0]


def _turn_table(turns: list[TurnRecord], width: int) -> Table:
    """One row per finished turn; the model's reply in what width is left (none below 100 columns)."""
    heads = ["session", "turn", "prompt", "cached", "plan", "PE KiB", "DE KiB", "TTFT ms", "TPOT ms"]
    table = Table(*heads, pad_edge=False)
    for c in table.columns:
        c.no_wrap = True
        c.justify = "left" if c.header in ("session", "plan") else "right"
    reply_width = width - 84
    if reply_width >= 16:
        table.add_column("reply", no_wrap=True, overflow="ellipsis", max_width=reply_width)
    for rec in list(turns):
        r = rec.result
        reply = " ".join(r.text.split()) or "-"
        if r.tool_calls:
            reply = "calls " + ", ".join(str(c["function"]["name"]) for c in r.tool_calls)
        table.add_row(
            f"s{rec.session + 1}",
            str(rec.turn + 1),
            str(r.usage.prompt_tokens),
            str(r.usage.cached_tokens),
            r.load.plan,
            _kib(r.load.bytes_pe),
            _kib(r.load.bytes_de),
            f"{r.timings.ttft_s * 1000:.0f}",
            f"{r.timings.tpot_s * 1000:.0f}",
            *([reply] if reply_width >= 16 else []),
        )
    return table


def _cold_baseline(
    cluster: Cluster, sessions: list[Session], summary: DemoSummary, console: Console
) -> list[str]:
    """Each session's final prompt stepped as token ids in a fresh session of another tenant, all
    side by side as the sessions' last turns ran; returns the baseline's session ids (left open:
    their pins name every block they wrote, so `_forget` finds them all)."""
    finals = []
    for i, session in enumerate(sessions):
        last = max((t for t in summary.turns if t.session == i), key=lambda t: t.turn).result
        finals.append((last, session.token_ids[: last.usage.prompt_tokens]))
    colds = [cluster.session(tenant=COLD_TENANT) for _ in sessions]
    results: dict[int, StepResult] = {}
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        tasks = [
            progress.add_task(f"Prefilling {_label(i, s)}'s final {len(ids)} tokens cold")
            for i, (s, (_, ids)) in enumerate(zip(sessions, finals, strict=True))
        ]

        async def prefill(i: int) -> None:
            results[i] = await colds[i].astep_tokens(finals[i][1], max_tokens=1)
            progress.update(tasks[i], completed=1, total=1)

        _concurrently([partial(prefill, i) for i in range(len(sessions))])
    for i, session in enumerate(sessions):
        last, cold = finals[i][0], results[i]
        summary.sessions.append(
            SessionSummary(
                _label(i, session),
                session.id,
                last.usage.prompt_tokens,
                last.usage.cached_tokens,
                last.timings.ttft_s,
                cold.timings.ttft_s,
                cold.usage.cached_tokens,
            )
        )
    return [c.id for c in colds]


def _print_summary(summary: DemoSummary, options: DemoOptions, storage: Path, console: Console) -> None:
    table = Table(
        "session",
        "final prompt",
        "cached",
        "TTFT reused ms",
        "TTFT cold ms",
        "cold / reused",
        title="Last turn: KV reloaded from the store vs the same prompt recomputed",
    )
    for c in table.columns[1:]:
        c.justify = "right"
    for s in summary.sessions:
        table.add_row(
            s.label,
            str(s.final_prompt),
            str(s.final_cached),
            f"{s.reused_ttft_s * 1000:.0f}",
            f"{s.cold_ttft_s * 1000:.0f}",
            f"{s.ratio:.1f}x",
        )
    if len(summary.sessions) > 1:
        reused = sum(s.reused_ttft_s for s in summary.sessions)
        cold = sum(s.cold_ttft_s for s in summary.sessions)
        table.add_section()
        table.add_row(
            "all",
            str(sum(s.final_prompt for s in summary.sessions)),
            str(sum(s.final_cached for s in summary.sessions)),
            f"{reused * 1000:.0f}",
            f"{cold * 1000:.0f}",
            f"{cold / reused:.1f}x" if reused > 0 else "-",
        )
    console.print(table)
    if any(s.cold_cached for s in summary.sessions):
        console.print("[yellow]warning: a cold baseline found cached blocks: its TTFT is not a recompute[/]")
    share = summary.cached_tokens / summary.prompt_tokens if summary.prompt_tokens else 0.0
    console.print(
        f"cached tokens: {summary.cached_tokens} of {summary.prompt_tokens} prompt tokens "
        f"over {len(summary.turns)} turns ({share:.0%}); KV read via PE {_mib(summary.bytes_pe)}, "
        f"via DE {_mib(summary.bytes_de)}"
    )
    console.print(
        f"engine start {summary.start_s:.0f} s, sessions {summary.run_s:.0f} s, "
        f"cold prefills {summary.cold_s:.0f} s (side by side, as the sessions' last turns ran)"
    )
    if options.storage is not None:
        console.print(f"the sessions stay in {storage}: dualpath sessions list --storage {storage}")


def _label(i: int, session: Session) -> str:
    return f"s{i + 1} {session.id[:8]}"


def _kib(n: int) -> str:
    return f"{n / 1024:,.0f}" if n else "-"


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"
