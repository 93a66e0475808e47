"""`dualpath demo | serve | info | sessions ... | store ...`: the command line.

`demo` (demo.py) and `serve` (gateway/serve.py) start a cluster and `info` loads the model;
`sessions` and `store` open only a persistent store (store/admin.py holds their logic, this module
prints it), so they run beside a live cluster.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from dualpath_sdk.demo import MAX_TURNS, DemoOptions, run_demo
from dualpath_sdk.errors import DualPathError, InvalidInput
from dualpath_sdk.store.admin import GC_MIN_AGE_S, GcReport, StoreAdmin, open_admin

if TYPE_CHECKING:
    from dualpath_sdk.gateway.auth import Keys

app = typer.Typer(add_completion=False, no_args_is_help=True, help="dualpath-sdk")
sessions_app = typer.Typer(
    no_args_is_help=True, help="Sessions persisted in a store (no engines are started)."
)
store_app = typer.Typer(
    invoke_without_command=True,
    help="The persistent store: usage (the default) and garbage collection (no engines are started).",
)
app.add_typer(sessions_app, name="sessions")
app.add_typer(store_app, name="store")
console = Console()


class ReadPlan(str, Enum):
    AUTO = "auto"
    PE = "pe"
    DE = "de"
    SPLIT = "split"
    ROTATE = "rotate"


Storage = Annotated[
    Path | None,
    typer.Option(
        help="store directory (default: the cache's store, $DUALPATH_CACHE/store or ~/.cache/dualpath/store)"
    ),
]
Capacity = Annotated[
    str | None,
    typer.Option(help="the capacity the cluster runs the store with (store.capacity_bytes), e.g. 20G"),
]


@app.command()
def demo(
    sessions: Annotated[int, typer.Option(min=1, max=8, help="agent sessions, run concurrently")] = 3,
    turns: Annotated[
        int,
        typer.Option(
            min=1, max=MAX_TURNS, help="turns per session: the task, then tool results (logs, files, diffs)"
        ),
    ] = 8,
    max_tokens: Annotated[int, typer.Option(min=1, max=256, help="tokens the model generates per turn")] = 24,
    storage: Annotated[
        Path | None,
        typer.Option(help="store directory, kept afterwards (default: a temporary one, removed at the end)"),
    ] = None,
    read_plan: Annotated[
        ReadPlan,
        typer.Option(
            help="where each turn's KV is read: auto (the scheduler's choice), pe, de, split (both), "
            "or rotate (pe, de, split in turn)"
        ),
    ] = ReadPlan.AUTO,
    temperature: Annotated[float, typer.Option(min=0.0, help="sampling temperature (0: greedy)")] = 0.0,
    seed: Annotated[
        int, typer.Option(min=0, help="sampling seed of session 1 (+1 per session), when temperature > 0")
    ] = 0,
    model: Annotated[
        str | None,
        typer.Option(hidden=True, help="HF directory or .gguf file (tests: a tiny model)"),
    ] = None,
) -> None:
    """Concurrent coding-agent sessions on the embedded cluster, then the same prompts cold.

    One prefill and one decode engine process serve a few scripted agent sessions (a task, then tool
    results: test logs, a source file, diffs); every turn after the first reloads the session's
    KV-Cache from the store instead of recomputing it. A live table shows each turn; the summary
    compares each session's last turn with its prompt prefilled from scratch in another tenant."""
    options = DemoOptions(
        sessions=sessions,
        turns=turns,
        max_tokens=max_tokens,
        storage=storage,
        read_plan=read_plan.value,
        temperature=temperature,
        seed=seed,
        model=model,
    )
    try:
        run_demo(options, console)
    except DualPathError as exc:
        _fail(exc)


@app.command()
def serve(
    host: Annotated[
        str,
        typer.Option(help="address to bind; off loopback (127.0.0.1, ::1, localhost) API keys are required"),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="port to bind (0: a free one)")] = 8400,
    model: Annotated[
        str | None, typer.Option(help="HF directory or .gguf file (default: the packaged model)")
    ] = None,
    prefill_nodes: Annotated[int, typer.Option(min=1, help="prefill nodes (one engine process each)")] = 1,
    decode_nodes: Annotated[int, typer.Option(min=1, help="decode nodes (one engine process each)")] = 1,
    storage: Storage = None,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            metavar="ADDRESS",
            help="run the engines on this Ray cluster ('auto': the one this host belongs to); "
            "--storage and --model must then be paths every host sees",
        ),
    ] = None,
    engines_per_node: Annotated[
        int, typer.Option(min=1, help="engines of each node, on one Ray node (with --ray)")
    ] = 1,
    api_key: Annotated[
        list[str] | None,
        typer.Option(
            envvar="DUALPATH_API_KEY",
            help="an API key of tenant 'default' (repeatable; at least 16 characters)",
        ),
    ] = None,
    keys_file: Annotated[
        Path | None, typer.Option(help='a JSON object of API keys and their tenants: {"<key>": "<tenant>"}')
    ] = None,
    max_body_bytes: Annotated[
        int | None, typer.Option(min=1, help="largest request body accepted, in bytes (default: 8 MiB)")
    ] = None,
    max_steps: Annotated[
        int | None, typer.Option(min=1, help="steps admitted at once; beyond: 429 (default: the cluster's)")
    ] = None,
    graceful_s: Annotated[
        float,
        typer.Option(
            min=0.0, help="seconds in-flight requests may finish on shutdown before they are cancelled"
        ),
    ] = 10.0,
) -> None:
    """Serve a cluster over HTTP: the sessions API, the OpenAI-compatible endpoint, /health, /metrics.

    The engines run on this machine, or with --ray on a Ray cluster (the ray extra), placed one Ray
    node per prefill/decode node where there are enough.

    Starts the engines, then the gateway, and prints its URL once it listens. SIGINT or SIGTERM
    stops it: no new connections, in-flight requests finish for --graceful-s and are then
    cancelled (a cancelled step leaves its session as it was), then the engines stop. Sessions stay
    in --storage and resume after a restart."""
    from dualpath_sdk.gateway.app import MAX_BODY_BYTES
    from dualpath_sdk.gateway.serve import check_exposure
    from dualpath_sdk.gateway.serve import serve as run_gateway

    try:
        keys = _serve_keys(api_key or [], keys_file)
        check_exposure(host, keys)  # before any engine starts
        overrides: dict[str, Any] = {} if max_steps is None else {"max_steps": max_steps}
        run_gateway(
            host,
            port,
            model=model,
            prefill_nodes=prefill_nodes,
            decode_nodes=decode_nodes,
            storage=storage,
            keys=keys,
            max_body_bytes=MAX_BODY_BYTES if max_body_bytes is None else max_body_bytes,
            graceful_s=graceful_s,
            ray_address=ray,
            engines_per_node=engines_per_node,
            **overrides,
        )
    except DualPathError as exc:
        _fail(exc)
    console.print("the gateway stopped, the cluster is closed")


def _serve_keys(api_keys: list[str], keys_file: Path | None) -> Keys | None:
    """The keys of `--keys-file` and of each `--api-key` (tenant "default"); None without any."""
    from dualpath_sdk.gateway.auth import Keys

    tenants: dict[str, str] = {}
    if keys_file is not None:
        Keys.load(keys_file)  # its errors, in its words
        tenants = json.loads(keys_file.read_text())
    for key in api_keys:
        if tenants.get(key, "default") != "default":
            raise InvalidInput(f"an --api-key is also in {keys_file} for tenant {tenants[key]!r}")
        tenants[key] = "default"
    return Keys(tenants) if tenants else None


@app.command()
def info() -> None:
    """Versions and the default model's shape."""
    import torch

    from dualpath_sdk.model.loader import load_model

    loaded = load_model()
    spec = loaded.spec
    console.print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    console.print(
        f"default model {loaded.name}: {spec.model_type}, {spec.num_layers} layers, "
        f"hidden {spec.hidden_size}, "
        f"{spec.num_heads} heads / {spec.num_kv_heads} KV heads, fingerprint {loaded.fingerprint}"
    )


# ---- sessions ---------------------------------------------------------------------------------------


@sessions_app.command("list")
def sessions_list(
    tenant: Annotated[str | None, typer.Option(help="only this tenant's sessions")] = None,
    storage: Storage = None,
) -> None:
    """Every session: id, tenant, tokens, blocks (stored / referenced), pin, last update."""
    with _admin(storage) as admin:
        rows = admin.sessions(tenant)
    table = Table("id", "tenant", "tokens", "blocks", "pinned until", "updated", "parent")
    for c in table.columns[2:4]:
        c.justify = "right"
    for r in rows:
        if r.damaged is not None:
            table.add_row(r.session_id, "?", "-", "-", "-", "-", f"[red]damaged: {r.damaged}[/]")
            continue
        table.add_row(
            r.session_id,
            r.tenant,
            str(r.tokens),
            f"{r.blocks_present}/{r.blocks}",
            _when(r.pinned_until),
            _when(r.updated_at),
            r.parent_id or "",
        )
    console.print(table)
    console.print(f"{len(rows)} session(s)")


@sessions_app.command("show")
def sessions_show(
    session_id: Annotated[str, typer.Argument(help="the session's id")],
    storage: Storage = None,
    keys: Annotated[bool, typer.Option("--keys", help="list every block key")] = False,
) -> None:
    """One session: its messages, token count, and which of its blocks the store holds."""
    with _admin(storage) as admin:
        d = admin.show(session_id)
    r = d.row
    console.print(
        f"[bold]{r.session_id}[/] tenant {r.tenant}, {r.tokens} tokens, created {_when(r.created_at)}, "
        f"updated {_when(r.updated_at)}" + (f", forked from {r.parent_id}" if r.parent_id else "")
    )
    if d.tools:
        console.print(f"tools: {', '.join(d.tools)}")
    table = Table("#", "role", "chars", "content", title=f"{len(d.messages)} messages")
    for i, m in enumerate(d.messages):
        extra = f"calls {', '.join(m.tool_calls)} " if m.tool_calls else ""
        extra += f"(result of {m.tool_call_id}) " if m.tool_call_id else ""
        table.add_row(str(i), m.role, str(m.chars), extra + m.preview)
    console.print(table)
    present = len(d.blocks) - d.missing
    pinned = sum(b.pinned_until is not None for b in d.blocks)
    stored = sum(b.nbytes or 0 for b in d.blocks)
    console.print(
        f"blocks: {len(d.blocks)} referenced, {present} present ({_size(stored)}), {d.missing} missing, "
        f"{pinned} pinned" + (f" until {_when(r.pinned_until)}" if r.pinned_until else "")
    )
    for b in d.blocks:
        if keys or not b.present:
            state = "present" if b.present else "[red]missing[/]"
            console.print(f"  {b.key} {state}" + (" pinned" if b.pinned_until else ""))


@sessions_app.command("delete")
def sessions_delete(
    session_id: Annotated[str, typer.Argument(help="the session's id")],
    storage: Storage = None,
    blocks: Annotated[
        bool, typer.Option("--blocks", help="also remove its blocks that no other session references")
    ] = False,
) -> None:
    """Delete a session's manifest and drop its pins.

    Its blocks stay until evicted or collected (`dualpath store gc --unreferenced`), or go now with
    --blocks. Refused while one of its steps runs."""
    with _admin(storage) as admin:
        done = admin.delete(session_id, blocks=blocks)
    console.print(
        f"deleted session {done.session_id} (tenant {done.tenant}), {done.pins_dropped} pin(s) dropped"
        + (f", {done.blocks_removed} block(s) removed" if blocks else "")
    )


# ---- the store --------------------------------------------------------------------------------------


@store_app.callback()
def store_main(ctx: typer.Context, storage: Storage = None, capacity: Capacity = None) -> None:
    """Without a command: usage. `--storage` given here applies to the command too."""
    ctx.obj = {"storage": storage, "capacity": capacity}
    if ctx.invoked_subcommand is None:
        store_usage(ctx, storage, capacity)


@store_app.command("usage")
def store_usage(ctx: typer.Context, storage: Storage = None, capacity: Capacity = None) -> None:
    """Stored bytes against capacity, pinned and unpinned bytes, block and session counts."""
    given = ctx.obj or {}
    capacity = capacity or given.get("capacity")
    with _admin(storage or given.get("storage"), _parse_size(capacity) if capacity else None) as admin:
        u = admin.usage()
    if u.capacity_bytes is not None:
        limit = f"capacity {_size(u.capacity_bytes)} ({u.stored_bytes / u.capacity_bytes:.1%} used)"
    else:
        limit = "capacity unbounded (--capacity: the cluster's store.capacity_bytes)"
    console.print(f"store {u.root}")
    rows = [
        ("stored", u.stored_bytes, u.blocks, limit),
        ("pinned", u.pinned_bytes, u.pinned_blocks, "live pins"),
        ("unpinned", u.unpinned_bytes, u.blocks - u.pinned_blocks, "evictable"),
    ]
    for name, nbytes, blocks, note in rows:
        console.print(f"  {name:<12} {_size(nbytes)} ({nbytes:,} bytes) in {blocks} blocks, {note}")
    console.print(f"  sessions     {u.sessions}, expired pins {u.expired_pins}")
    console.print(f"  quarantined  {u.quarantined_files} file(s), {_size(u.quarantined_bytes)}")
    console.print(f"  file system  {_size(u.fs_free_bytes)} free of {_size(u.fs_total_bytes)}")


@store_app.command("gc")
def store_gc(
    ctx: typer.Context,
    storage: Storage = None,
    unreferenced: Annotated[
        bool,
        typer.Option(
            "--unreferenced", help="also remove blocks no session references and no live pin protects"
        ),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print what would be removed, remove nothing")
    ] = False,
    min_age: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="seconds: leave block files younger, and blocks used more recently, than this alone "
            "(a running step's blocks are in no manifest until it ends)",
        ),
    ] = GC_MIN_AGE_S,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="list every pin, file and block removed")
    ] = False,
) -> None:
    """Remove expired pins and orphaned blocks; prints what it removed.

    Orphans: block files the index does not know, index rows whose file is gone. With
    --unreferenced, also blocks that no session references and no live pin protects."""
    with _admin(storage or (ctx.obj or {}).get("storage")) as admin:
        report = admin.gc(unreferenced=unreferenced, dry_run=dry_run, min_age_s=min_age)
    _print_gc(report, verbose)


def _print_gc(report: GcReport, verbose: bool) -> None:
    verb = "would remove" if report.dry_run else "removed"
    orphan_bytes = _size(sum(f.nbytes for f in report.orphan_files))
    unreferenced_bytes = _size(sum(b.nbytes for b in report.unreferenced))
    lines = [
        (f"{len(report.expired_pins)} expired pin(s)", [f"{p.owner} {p.key}" for p in report.expired_pins]),
        (
            f"{len(report.orphan_files)} orphan block file(s) ({orphan_bytes})",
            [str(f.path) for f in report.orphan_files],
        ),
        (f"{len(report.stale_rows)} index row(s) without a file", [r.key for r in report.stale_rows]),
        (
            f"{len(report.unreferenced)} unreferenced block(s) ({unreferenced_bytes})",
            [b.key for b in report.unreferenced],
        ),
    ]
    for head, items in lines:
        console.print(f"{verb} {head}")
        if verbose:
            for item in items:
                console.print(f"  {item}")
    console.print(f"{'would free' if report.dry_run else 'freed'} {_size(report.freed_bytes)}")


# ---- helpers ----------------------------------------------------------------------------------------


@contextmanager
def _admin(storage: Path | None, capacity: int | None = None) -> Iterator[StoreAdmin]:
    """The store opened for a command; its errors (none there, a session not found, busy) are
    printed, not a traceback."""
    try:
        with open_admin(storage, capacity) as admin:
            yield admin
    except DualPathError as exc:
        _fail(exc)


def _fail(exc: DualPathError) -> NoReturn:
    what = str(exc)
    console.print(f"[red]error ({type(exc).__name__}):[/] {what}")
    raise typer.Exit(1)


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if m is None:
        raise typer.BadParameter(f"{text!r} is not a size such as 20G or 512M", param_hint="--capacity")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _size(n: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{int(n):,} B" if i == 0 else f"{n:,.1f} {units[i]}"


def _when(t: float | None) -> str:
    return "-" if not t else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


if __name__ == "__main__":
    app()
