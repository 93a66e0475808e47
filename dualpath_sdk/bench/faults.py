"""Faults under load: concurrent agent sessions on real clusters while faults hit targeted points.

Every agent is a thread that resumes its session (primed once: a ~256-token first prompt) and steps
it turn after turn through the public API (`step_tokens`, greedy, `ignore_eos`, 16 new tokens). A
step that raises a typed error (`dp.DualPathError`) is retried by the agent, the same turn, up to
3 times. Every scenario starts a fresh cluster on a fresh copy of the primed store, whose storage
NICs are capped so that a step's reads take long enough to be hit "mid-read".

Scenarios (an injector thread polls the controller's step states every few ms, under its lock):
- none: the baseline;
- kill PE mid-read: a step placed on the PE whose PE-side reads are in flight (the PE's read_q > 0)
  -> SIGKILL the PE;
- kill PE mid-prefill: a step whose reads are done, not yet prefilled -> SIGKILL the PE;
- kill DE mid-transfer: the same phase (the PE writes layer KV into the DE's buffer) -> the DE;
- kill DE mid-decode: a step whose first token has streamed -> SIGKILL its DE;
- corrupt blocks / truncate blocks: at turn boundaries, bytes of random stored blocks' payloads are
  flipped, or the files cut short: the store must detect it and the engines recompute;
- store read-only: for about one turn the store cannot be written (a tmpfs remounted read-only or,
  where the kernel refuses that because files are open for writing, filled to the brim);
- poison requests: a hostile thread sends bad calls through the public API and raw requests straight
  to the controller (SamplingParams broken past their checks); they must fail alone, typed.

Per scenario x topology it counts steps ok, steps the cluster retried, typed errors the agents saw,
untyped errors (anything else reaching an agent), wrong tokens (a successful step whose ids differ
from an in-process EngineCore's greedy continuation of the agent's own prompt), sessions changed (a
failed step that changed `session.token_ids`, a successful one that did not record exactly its
prompt and output, or a resumed session at the end that differs from the agent's record), and engine
restarts a bad request caused (in the other rows: restarts beyond the ones the scenario's kills
caused). Targets: zero in the last four counting columns.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import queue
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from dualpath_sdk.api.cluster import Cluster
from dualpath_sdk.cluster.controller import StepRequest
from dualpath_sdk.config import EngineConfig, StoreConfig
from dualpath_sdk.errors import DualPathError, StorageError

BLOCK = 64
POOL_BLOCKS = 192  # each engine's KV pool
BUFFER_SLOTS = 112  # each node's host buffer: 7168 tokens, below the model's 8192-token context
SNIC_BPS = 24e6  # every node's storage-NIC read cap: a history's reads take a good fraction of a second
GEN = 16
AGENT_RETRIES = 3  # an agent retries a turn that raised a typed error this many times
HEADER_BYTES = 4096  # an fs block file's header; the payload follows
TOPOLOGIES = {"1P1D": (1, 1), "1P2D": (1, 2)}
POLL_S = 0.003
RAW_FOLLOW_S = 20.0  # how long a raw request the engines accepted is followed before it is cancelled

Figures = dict[str, Any]


# ---- pure helpers ---------------------------------------------------------------------------------


def step_phase(
    pe: str | None, de: str | None, plan: str, prefilled: object | None, pe_reading: bool, de_reading: bool
) -> str:
    """Where one controller step is, from its state and whether each of its engines is reading.

    "queued": not placed (or placed again after a retry); "decode": its first token has streamed;
    "pe-read" / "de-read": that side of its plan is still reading; else "prefill": the reads are
    done and the PE computes the prompt's new tokens, writing their KV into the DE's buffer. An
    engine's reading is its own (other steps' reads count too), so this is an approximation."""
    if pe is None or de is None:
        return "queued"
    if prefilled is not None:
        return "decode"
    if plan in ("pe", "split") and pe_reading:
        return "pe-read"
    if plan in ("de", "split") and de_reading:
        return "de-read"
    return "prefill"


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first index where two token lists differ (a length difference counts), else None."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def session_mismatch(record: Sequence[int], stored: Sequence[int]) -> str | None:
    """None when a session's token ids are exactly the agent's record, else what differs."""
    i = first_difference(record, stored)
    if i is None:
        return None
    return (
        f"{len(stored)} tokens stored vs {len(record)} recorded, first difference at {i} "
        f"(recorded {list(record[i : i + 4])}, stored {list(stored[i : i + 4])})"
    )


def unplanned_restarts(restarts: dict[str, int], kills: dict[str, int]) -> int:
    """Engine restarts beyond one per kill of that engine."""
    return sum(max(0, n - kills.get(eid, 0)) for eid, n in restarts.items())


# ---- the workload and its references -----------------------------------------------------------------


@dataclass(frozen=True)
class Agent:
    name: str
    first: list[int]  # the primed first prompt
    turns: list[list[int]]  # tokens appended by each measured turn


def workload(n: int, turns: int, vocab: int, first: int = 256, append: int = 48) -> list[Agent]:
    """Seeded agents: a first prompt of ~`first` tokens, then `turns` appends of ~`append` tokens
    (sizes jittered, so tail blocks are partial in different places)."""
    agents = []
    for a in range(n):
        rng = random.Random(7919 + a)
        size = first + rng.randint(-8, 8)
        sizes = [append + rng.randint(-8, 8) for _ in range(turns)]
        agents.append(
            Agent(
                f"fault-agent{a}",
                [rng.randrange(vocab) for _ in range(size)],
                [[rng.randrange(vocab) for _ in range(k)] for k in sizes],
            )
        )
    return agents


class References:
    """Greedy continuations by a fresh in-process EngineCore per prompt (no prefix reuse), cached by
    prompt: a correct run reproduces the same histories whatever the faults, so scenarios share them."""

    def __init__(self, gen: int = GEN) -> None:
        from dualpath_sdk.model.loader import load_model

        self.model = load_model()
        self.gen = gen
        self.cache: dict[tuple[int, ...], list[int]] = {}
        self.lock = threading.Lock()
        self.computed_s = 0.0

    def __call__(self, prompt: Sequence[int]) -> list[int]:
        from dualpath_sdk.engine.core import EngineCore
        from dualpath_sdk.engine.sequence import SamplingParams

        key = tuple(prompt)
        with self.lock:
            if key not in self.cache:
                started = time.perf_counter()
                blocks = -(-(len(key) + self.gen) // BLOCK) + 1
                engine = EngineCore(self.model, EngineConfig(block_size=BLOCK, num_blocks=blocks))
                params = SamplingParams(max_tokens=self.gen, ignore_eos=True)
                self.cache[key] = list(engine.generate([list(key)], params)[0].output_ids)
                self.computed_s += time.perf_counter() - started
            return self.cache[key]

    def history(self, agent: Agent, upto: int) -> list[int]:
        """The agent's whole conversation after `upto` measured turns, every output the reference."""
        tokens = [*agent.first, *self(agent.first)]
        for new in agent.turns[:upto]:
            prompt = [*tokens, *new]
            tokens = [*prompt, *self(prompt)]
        return tokens


# ---- one agent ------------------------------------------------------------------------------------


@dataclass
class AgentRun:
    agent: Agent
    record: list[int]  # the agent's own record of its conversation
    ok: int = 0
    typed: int = 0
    untyped: int = 0
    wrong: int = 0
    changed: int = 0
    gave_up: int = 0
    cached_tokens: int = 0
    persist_failed: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    messages: Counter[str] = field(default_factory=Counter)  # "kind: message" of each error seen
    attempts: list[list[float]] = field(default_factory=list)  # [start, end (0: running)]
    turn: int = 0  # the measured turn being stepped (1-based)
    done_turns: int = 0
    finished: bool = False
    problems: list[str] = field(default_factory=list)


def _drive(ctx: Ctx, run: AgentRun) -> None:
    try:
        session = _resume(ctx, run)
        if session is None:
            return
        for t, new in enumerate(run.agent.turns, start=1):
            run.turn = t
            for attempt in range(AGENT_RETRIES + 1):
                if ctx.stop.is_set():
                    return
                ctx.fault.before_step(ctx, run, t)
                before = session.token_ids
                span = [time.monotonic(), 0.0]
                run.attempts.append(span)
                try:
                    result = session.step_tokens(new, max_tokens=GEN, ignore_eos=True)
                except DualPathError as exc:
                    span[1] = time.monotonic()
                    run.typed += 1
                    run.kinds[type(exc).__name__] += 1
                    run.messages[f"{type(exc).__name__}: {str(exc)[:160]}"] += 1
                    _check_unchanged(run, t, session.token_ids, before, exc)
                    if attempt == AGENT_RETRIES:
                        run.gave_up += 1
                        run.problems.append(
                            f"{run.agent.name} turn {t}: gave up after {attempt + 1} attempts"
                        )
                    else:
                        ctx.stop.wait(_backoff(exc, attempt))
                    continue
                except Exception as exc:  # not ours: a bug
                    span[1] = time.monotonic()
                    run.untyped += 1
                    run.kinds[f"untyped {type(exc).__name__}"] += 1
                    run.messages[f"untyped {type(exc).__name__}: {str(exc)[:160]}"] += 1
                    run.problems.append(
                        f"{run.agent.name} turn {t}: untyped {type(exc).__name__}: {exc}\n"
                        + "".join(traceback.format_exception(exc)[-3:])
                    )
                    _check_unchanged(run, t, session.token_ids, before, exc)
                    ctx.stop.wait(0.5)
                    continue
                span[1] = time.monotonic()
                _accept(ctx, run, t, attempt, new, before, session.token_ids, result)
                break
            run.done_turns = t
        _check_resumed(ctx, run)
    except Exception as exc:  # the agent itself broke: report it, never hang the run
        run.untyped += 1
        run.problems.append(f"{run.agent.name}: agent crashed: {exc!r}\n{traceback.format_exc()}")
    finally:
        run.finished = True


def _resume(ctx: Ctx, run: AgentRun) -> Any:
    for attempt in range(AGENT_RETRIES + 1):
        try:
            session = ctx.cluster.resume(run.agent.name)
        except DualPathError as exc:
            run.typed += 1
            run.kinds[type(exc).__name__] += 1
            ctx.stop.wait(_backoff(exc, attempt))
            continue
        problem = session_mismatch(run.record, session.token_ids)
        if problem is not None:
            run.changed += 1
            run.problems.append(
                f"{run.agent.name}: resumed at the start differs from the primed record: {problem}"
            )
            run.record = session.token_ids
        return session
    run.problems.append(f"{run.agent.name}: could not resume its session")
    run.gave_up += len(run.agent.turns)
    return None


def _backoff(exc: BaseException, attempt: int) -> float:
    """An agent waits longer after a store failure (it retries later) than after a lost engine."""
    return 1.5 * 2**attempt if isinstance(exc, StorageError) else 0.25 * (attempt + 1)


def _check_unchanged(run: AgentRun, turn: int, now: list[int], before: list[int], exc: BaseException) -> None:
    problem = session_mismatch(before, now)
    if problem is not None:
        run.changed += 1
        run.problems.append(
            f"{run.agent.name} turn {turn}: a failed step ({type(exc).__name__}: {exc}) "
            f"changed the session: {problem}"
        )


def _accept(
    ctx: Ctx,
    run: AgentRun,
    turn: int,
    attempt: int,
    new: list[int],
    before: list[int],
    now: list[int],
    result: Any,
) -> None:
    run.ok += 1
    run.cached_tokens += result.usage.cached_tokens
    run.persist_failed += result.persist.failed
    prompt = [*run.record, *new]
    out = list(result.token_ids)
    expected = ctx.refs(prompt)
    i = first_difference(expected, out)
    if i is not None:
        run.wrong += 1
        run.problems.append(
            f"{run.agent.name} turn {turn} (attempt {attempt + 1}): WRONG TOKENS from index {i}: "
            f"expected {expected[i : i + 6]}, got {out[i : i + 6]} (prompt {len(prompt)} tokens, "
            f"cached {result.usage.cached_tokens}, plan {result.load.plan}, "
            f"persisted {result.persist.blocks} failed {result.persist.failed})"
        )
    problem = session_mismatch([*before, *new, *out], now)
    if problem is not None:
        run.changed += 1
        run.problems.append(
            f"{run.agent.name} turn {turn}: the step's session is not prompt + output: {problem}"
        )
    run.record = [*prompt, *out]


def _check_resumed(ctx: Ctx, run: AgentRun) -> None:
    try:
        resumed = ctx.cluster.resume(run.agent.name).token_ids
    except DualPathError as exc:
        run.changed += 1
        run.problems.append(f"{run.agent.name}: LOST: resuming at the end raised {type(exc).__name__}: {exc}")
        return
    problem = session_mismatch(run.record, resumed)
    if problem is not None:
        run.changed += 1
        run.problems.append(
            f"{run.agent.name}: the resumed session differs from the agent's record: {problem}"
        )


# ---- a scenario's run ---------------------------------------------------------------------------------


@dataclass
class Ctx:
    cluster: Cluster
    root: Path  # the store's root
    runs: list[AgentRun]
    fault: Fault
    refs: References
    quick: bool
    stop: threading.Event = field(default_factory=threading.Event)  # the watchdog's: agents leave
    done: threading.Event = field(default_factory=threading.Event)  # the agents have all finished
    rng: random.Random = field(default_factory=lambda: random.Random(4242))

    @property
    def controller(self) -> Any:
        return self.cluster._launcher.controller

    @property
    def launcher(self) -> Any:
        return self.cluster._launcher

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.cluster.metrics().get_sample_value(name, labels or {}) or 0.0

    def steps_ok(self) -> float:
        return self.metric("dualpath_steps_total", {"outcome": "ok"})


class PidWatch(threading.Thread):
    """Every process id each engine has had (the launcher's and the one its Hello gave): restarts."""

    def __init__(self, ctx: Ctx) -> None:
        super().__init__(name="faults-pids", daemon=True)
        self.ctx = ctx
        self.pids: dict[str, set[int]] = {}
        self.halt = threading.Event()
        self.poll()

    def poll(self) -> None:
        for eid, process in list(self.ctx.launcher.processes.items()):
            self.pids.setdefault(eid, set()).add(process.pid)
        with self.ctx.controller.lock:
            for eid, engine in self.ctx.controller.engines.items():
                self.pids.setdefault(eid, set()).add(engine.hello.pid)

    def run(self) -> None:
        while not self.halt.wait(0.05):
            self.poll()

    def restarts(self) -> dict[str, int]:
        self.poll()
        counted = {
            eid: int(self.ctx.metric("dualpath_engine_restarts_total", {"engine": eid})) for eid in self.pids
        }
        return {eid: max(len(pids) - 1, counted[eid]) for eid, pids in self.pids.items()}


class Fault:
    """A scenario's fault: `setup` gives the store root for the copy, `start`/`stop` run the injector,
    `before_step` is the agents' hook before every step attempt."""

    title = "none"

    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.limit = 2 if quick else 4
        self.injections = 0
        self.detail = ""  # more about the injections, for the table
        self.kills: Counter[str] = Counter()
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.extra: Figures = {}
        self._thread: threading.Thread | None = None
        self.lock = threading.Lock()

    def setup(self, work: Path) -> tuple[Path | None, str | None]:
        """(the directory to copy the primed store into, None) or (None, why the row is skipped)."""
        return work / "store", None

    def teardown(self) -> None:
        """After the cluster closed."""

    def start(self, ctx: Ctx) -> None:
        if type(self).run is not Fault.run:
            self._thread = threading.Thread(
                target=self._guarded, args=(ctx,), name="faults-injector", daemon=True
            )
            self._thread.start()

    def _guarded(self, ctx: Ctx) -> None:
        try:
            self.run(ctx)
        except Exception as exc:
            self.problems.append(f"the injector crashed: {exc!r}\n{traceback.format_exc()}")

    def run(self, ctx: Ctx) -> None:
        """The injector thread's body; returns when ctx.done is set or it has fired enough."""

    def stop(self, ctx: Ctx) -> None:
        if self._thread is not None:
            self._thread.join(180)
            if self._thread.is_alive():
                self.problems.append("the injector did not stop")

    def before_step(self, ctx: Ctx, run: AgentRun, turn: int) -> None:
        pass


class KillFault(Fault):
    """SIGKILL the PE or the DE of a step found in `phase`; then wait until the engine is back."""

    def __init__(self, quick: bool, phase: str, role: str, title: str) -> None:
        super().__init__(quick)
        self.phase, self.role, self.title = phase, role, title
        self.seen: set[tuple[str, int, str]] = set()  # (step, attempt, phase) seen by the poller
        self.collateral: Counter[str] = Counter()  # phases of the other steps on a killed engine

    def run(self, ctx: Ctx) -> None:
        nic = NicWatch(ctx)
        nic.start()
        try:
            while not ctx.done.is_set() and self.injections < self.limit:
                victim = self._find(ctx, nic)
                if victim is None:
                    ctx.done.wait(POLL_S)
                    continue
                eid, pid, req_id = victim
                self.injections += 1
                self.kills[eid] += 1
                self.notes.append(f"killed {eid} (pid {pid}) at {req_id} in {self.phase}")
                if not _wait_back(ctx, eid, pid, timeout=180):
                    self.problems.append(f"{eid} did not come back within 180 s of its kill")
                    return
                # spaced out: the cluster serves a turn's worth of steps before the next kill
                _wait_serving(ctx, steps=len(ctx.runs), timeout=90)
        finally:
            nic.halt.set()
            nic.join(2)
            self.detail = ", ".join(f"{eid} x{n}" for eid, n in sorted(self.kills.items()))
            self.extra["step_phases_seen"] = dict(Counter(phase for _, _, phase in self.seen))
            self.extra["collateral_steps"] = dict(self.collateral)

    def _find(self, ctx: Ctx, nic: NicWatch) -> tuple[str, int, str] | None:
        controller = ctx.controller
        with controller.lock:
            for step in list(controller.steps.values()):
                phase = _phase_of(controller, step, nic)
                self.seen.add((step.req_id, step.attempts, phase))
                if phase != self.phase:
                    continue
                eid = step.pe if self.role == "pe" else step.de
                engine = controller.engines.get(eid)
                process = ctx.launcher.processes.get(eid)
                if engine is None or not engine.alive or process is None or process.poll() is not None:
                    continue
                for other in controller.steps.values():  # what else the kill takes down with it
                    if other is not step and eid in (other.pe, other.de):
                        self.collateral[_phase_of(controller, other, nic)] += 1
                return eid, ctx.cluster.kill_engine(eid), step.req_id  # under the lock: still in phase
        return None


class NicWatch(threading.Thread):
    """When each node's storage NIC last granted read bytes: a node whose count moved within
    ACTIVE_S is reading now (an engine's read_q alone lags while its loop runs a long prefill)."""

    ACTIVE_S = 0.3

    def __init__(self, ctx: Ctx) -> None:
        super().__init__(name="faults-nic", daemon=True)
        self.ctx = ctx
        self.halt = threading.Event()
        self.last: dict[str, tuple[float, float]] = {}  # node -> (read bytes, when they last moved)

    def run(self) -> None:
        while not self.halt.wait(0.01):
            now = time.monotonic()
            for node, (read, _) in self.ctx.cluster.storage_nic_bytes().items():
                if node not in self.last or self.last[node][0] != read:
                    self.last[node] = (read, now)

    def reading(self, node: str) -> bool:
        seen = self.last.get(node)
        return seen is not None and time.monotonic() - seen[1] < self.ACTIVE_S


def _phase_of(controller: Any, step: Any, nic: NicWatch) -> str:
    def engine(eid: str | None) -> Any:
        return controller.engines.get(eid) if eid is not None else None

    pe, de = engine(step.pe), engine(step.de)
    pe_reading = (
        pe is not None and pe.report is not None and pe.report.read_q > 0 and nic.reading(pe.hello.node)
    )
    # the DE's Admitted (de_read_s > 0) says its reads are done and the PE has its slots
    de_reading = de is not None and (
        step.de_read_s == 0.0
        or (de.report is not None and de.report.read_q > 0 and nic.reading(de.hello.node))
    )
    return step_phase(step.pe, step.de, step.plan, step.prefilled, pe_reading, de_reading)


def _wait_back(ctx: Ctx, eid: str, old_pid: int, timeout: float) -> bool:
    """Until a new process of `eid` has said hello, is alive and has reported."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        process = ctx.launcher.processes.get(eid)
        with ctx.controller.lock:
            engine = ctx.controller.engines.get(eid)
            if (
                process is not None
                and process.pid != old_pid
                and engine is not None
                and engine.alive
                and engine.hello.pid == process.pid
                and engine.report is not None
            ):
                return True
        time.sleep(0.05)
    return False


def _wait_serving(ctx: Ctx, steps: int, timeout: float) -> None:
    """Until `steps` more steps have finished (the cluster serves again), the agents are done, or
    `timeout`."""
    start, deadline = ctx.steps_ok(), time.monotonic() + timeout
    while time.monotonic() < deadline and not ctx.done.is_set():
        if ctx.steps_ok() >= start + steps:
            return
        ctx.done.wait(0.05)


class BlockFault(Fault):
    """At turn boundaries (the first agent to start turn 2, 3, ...), damage random stored blocks:
    flip payload bytes ("corrupt") or cut the file short ("truncate")."""

    def __init__(self, quick: bool, kind: str, title: str) -> None:
        super().__init__(quick)
        self.kind, self.title = kind, title
        self.files = 0
        self.last_turn = 1

    def before_step(self, ctx: Ctx, run: AgentRun, turn: int) -> None:
        with self.lock:
            if self.injections >= self.limit or turn <= self.last_turn:
                return
            self.last_turn = turn
            paths = sorted((ctx.root / "blocks").glob("*/*.kv"))
            chosen = ctx.rng.sample(paths, min(len(paths), len(ctx.runs)))
            for path in chosen:
                with contextlib.suppress(FileNotFoundError):  # quarantined meanwhile
                    damage(path, self.kind, ctx.rng)
                    self.files += 1
            self.injections += 1
            self.detail = f"{self.files} files"


def damage(path: Path, kind: str, rng: random.Random) -> None:
    """Flip 8 bytes of a block file's payload, or truncate it to a random shorter length."""
    size = path.stat().st_size
    if kind == "truncate":
        os.truncate(path, rng.randrange(0, size))
        return
    with path.open("r+b") as f:
        for offset in sorted(rng.randrange(HEADER_BYTES, size) for _ in range(8)):
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0xFF]))


class ReadOnlyFault(Fault):
    """The store on its own tmpfs; for about one turn it cannot be written: remounted read-only, or,
    where the kernel refuses (files open for writing: the index's SQLite files, EBUSY), filled to the
    brim so that every new block and manifest fails with ENOSPC."""

    title = "store read-only"

    def __init__(self, quick: bool, size_mb: int) -> None:
        super().__init__(quick)
        self.limit = 1 if quick else 2
        self.size_mb = size_mb
        self.mount: Path | None = None
        self.mode = ""  # "ro" or "full" while the fault holds
        self.mode_used = ""  # ... and the last way it held
        self.windows: list[float] = []

    def setup(self, work: Path) -> tuple[Path | None, str | None]:
        mount = work / "tmpfs"
        mount.mkdir(parents=True)
        done = _sh("mount", "-t", "tmpfs", "-o", f"size={self.size_mb}m,mode=0700", "tmpfs", str(mount))
        if done.returncode != 0:
            return None, f"mount -t tmpfs is not permitted here: {done.stderr.strip() or done.returncode}"
        self.mount = mount
        return mount / "store", None

    def run(self, ctx: Ctx) -> None:
        assert self.mount is not None
        targets = [1, 3][: self.limit]  # after every agent finished turn 1 (and 3)
        for target in targets:
            while not ctx.done.is_set():
                left = [r for r in ctx.runs if not r.finished]
                if left and min(r.done_turns for r in left) >= target:
                    break
                ctx.done.wait(0.02)
            if ctx.done.is_set():
                break
            fired = time.monotonic()
            self._fault()
            self.injections += 1
            # one turn: until every agent still stepping has had a step attempt start and end
            deadline = fired + 90
            while time.monotonic() < deadline and not ctx.done.is_set():
                left = [r for r in ctx.runs if not r.finished]
                if all(any(s >= fired and e > 0 for s, e in r.attempts) for r in left):
                    break
                ctx.done.wait(0.02)
            self._restore()
            self.windows.append(round(time.monotonic() - fired, 2))
        if self.windows:
            self.detail = f"{self.mode_used}, {'/'.join(f'{w:.0f}' for w in self.windows)} s"
        self.extra["windows_s"] = self.windows
        self.extra["unwritable_as"] = {"ro": "read-only remount", "full": "full tmpfs (ENOSPC)"}.get(
            self.mode_used, "-"
        )

    def _fault(self) -> None:
        assert self.mount is not None
        ro = _sh("mount", "-o", "remount,ro", str(self.mount))
        if ro.returncode == 0:
            self.mode = self.mode_used = "ro"
            return
        if not self.mode_used:
            why = ro.stderr.strip().splitlines()[0] if ro.stderr.strip() else f"exit {ro.returncode}"
            self.notes.append(
                f"remount,ro refused ({why}): "
                "the store's files are open for writing; emulated as a full store (ENOSPC)"
            )
        st = os.statvfs(self.mount)
        used_kb = (st.f_blocks - st.f_bfree) * st.f_frsize // 1024 + 4
        shrink = _sh("mount", "-o", f"remount,size={used_kb}k", str(self.mount))
        if shrink.returncode != 0:
            self.problems.append(f"could not shrink the tmpfs: {shrink.stderr.strip()}")
        filler = self.mount / "filler"
        try:
            with filler.open("wb", buffering=0) as f:
                chunk = bytes(1 << 16)
                while True:
                    f.write(chunk)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                self.problems.append(f"filling the tmpfs: {exc}")
        with contextlib.suppress(OSError), (self.mount / "filler2").open("wb", buffering=0) as f:
            while True:
                f.write(b"\0" * 512)
        self.mode = self.mode_used = "full"

    def _restore(self) -> None:
        assert self.mount is not None
        if self.mode == "ro":
            done = _sh("mount", "-o", "remount,rw", str(self.mount))
            if done.returncode != 0:
                self.problems.append(f"remount,rw failed: {done.stderr.strip()}")
        elif self.mode == "full":
            for name in ("filler", "filler2"):
                (self.mount / name).unlink(missing_ok=True)
            done = _sh("mount", "-o", f"remount,size={self.size_mb}m", str(self.mount))
            if done.returncode != 0:
                self.problems.append(f"could not grow the tmpfs back: {done.stderr.strip()}")
        self.mode = ""

    def stop(self, ctx: Ctx) -> None:
        super().stop(ctx)
        if self.mode:
            self._restore()

    def teardown(self) -> None:
        if self.mount is not None:
            if self.mode:
                self._restore()
            if _sh("umount", str(self.mount)).returncode != 0:
                _sh("umount", "-l", str(self.mount))
            self.mount = None


def _sh(*args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(list(args), capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(list(args), 1, "", str(exc))


class PoisonFault(Fault):
    """A hostile caller beside the agents: bad public calls and raw requests past the boundary."""

    title = "poison requests"

    def __init__(self, quick: bool) -> None:
        super().__init__(quick)
        self.rounds = 2 if quick else 3
        self.outcomes: Counter[str] = Counter()  # typed / accepted / untyped / unanswered / changed
        self.kinds: Counter[str] = Counter()

    def run(self, ctx: Ctx) -> None:
        ctx.done.wait(1.0)  # the agents are under way
        session = ctx.cluster.session(tenant="hostile")
        vocab = ctx.cluster.facts.vocab_size
        rng = random.Random(666)
        for _ in range(self.rounds):
            if ctx.done.is_set():
                break
            for what, call in _public_calls(ctx.cluster, session, vocab, rng):
                before = session.token_ids
                self._call(what, call)
                if session_mismatch(before, session.token_ids) is not None:
                    self.outcomes["changed"] += 1
                    self.problems.append(f"poison {what}: the hostile session changed")
            for what, request in _raw_requests(vocab, rng):
                self._raw(ctx, what, request)
            ctx.done.wait(2.0)
        self.detail = f"{self.injections} calls"
        self.extra["poison"] = dict(self.outcomes)
        self.extra["poison_kinds"] = dict(self.kinds)

    def _call(self, what: str, call: Callable[[], object]) -> None:
        self.injections += 1
        try:
            call()
        except DualPathError as exc:
            self.outcomes["typed"] += 1
            self.kinds[type(exc).__name__] += 1
            return
        except Exception as exc:
            self.outcomes["untyped"] += 1
            self.problems.append(f"poison {what}: untyped {type(exc).__name__}: {exc}")
            return
        self.outcomes["accepted"] += 1
        self.problems.append(f"poison {what}: accepted")

    def _raw(self, ctx: Ctx, what: str, request: StepRequest) -> None:
        self.injections += 1
        controller = ctx.controller
        try:
            req_id, events = controller.submit(request)
        except DualPathError as exc:
            self.outcomes["typed"] += 1
            self.kinds[type(exc).__name__] += 1
            return
        except Exception as exc:
            self.outcomes["untyped"] += 1
            self.problems.append(f"poison raw {what}: submit raised untyped {type(exc).__name__}: {exc}")
            return
        tokens, end, event = 0, "", None
        try:
            deadline = time.monotonic() + 180  # an answer; once tokens flow, RAW_FOLLOW_S more at most
            while True:
                try:
                    event = events.get(timeout=max(0.01, deadline - time.monotonic()))
                except queue.Empty:
                    end = "still generating" if tokens else "no answer in 180 s"
                    break
                if isinstance(event, DualPathError):
                    end = f"{type(event).__name__}: {str(event)[:100]}"
                    break
                if isinstance(event, list):
                    if not tokens:
                        deadline = min(deadline, time.monotonic() + RAW_FOLLOW_S)
                    tokens += len(event)
                    continue
                end = f"finished ({getattr(event, 'finish_reason', event)!r})"
                break
        finally:
            controller.cancel(req_id)
        if isinstance(event, DualPathError):
            self.outcomes["typed"] += 1
            self.kinds[type(event).__name__] += 1
            if tokens:
                self.problems.append(
                    f"poison raw {what}: refused only after {tokens} tokens streamed ({end})"
                )
        elif not tokens:
            self.outcomes["unanswered"] += 1
            self.problems.append(f"poison raw {what}: {end}")
        else:
            self.outcomes["accepted"] += 1
            self.problems.append(
                f"poison raw {what}: ACCEPTED: {tokens} tokens streamed, then {end} "
                f"(cancelled after at most {RAW_FOLLOW_S:.0f} s)"
            )


def _public_calls(
    cluster: Cluster, session: Any, vocab: int, rng: random.Random
) -> list[tuple[str, Callable[[], object]]]:
    ids = [rng.randrange(vocab) for _ in range(8)]
    over_buffer = [rng.randrange(vocab) for _ in range(BUFFER_SLOTS * BLOCK + 300)]  # within the context
    return [
        ("max_tokens=8.5", lambda: session.step_tokens(ids, max_tokens=8.5)),
        ("temperature=nan", lambda: session.step_tokens(ids, max_tokens=2, temperature=math.nan)),
        ("seed=2**70", lambda: session.step_tokens(ids, max_tokens=2, seed=2**70)),
        ("top_p=0", lambda: session.step_tokens(ids, max_tokens=2, top_p=0.0)),
        ("read_plan=sideways", lambda: session.step_tokens(ids, max_tokens=2, read_plan="sideways")),
        ("role banana", lambda: session.step({"role": "banana", "content": "hi"}, max_tokens=2)),
        ("content None", lambda: session.step({"role": "user", "content": None}, max_tokens=2)),
        ("token id = vocab", lambda: session.step_tokens([1, vocab], max_tokens=2)),
        ("token id -1", lambda: session.step_tokens([1, -1], max_tokens=2)),
        (
            "a prompt over the context",
            lambda: session.step_tokens([1] * (cluster.facts.max_context + 1), max_tokens=2),
        ),
        (
            "a prompt over the DE buffer",
            lambda: session.step_tokens(over_buffer, max_tokens=2, ignore_eos=True),
        ),
        ("tenant ../etc", lambda: cluster.session(tenant="../etc")),
        ("session id with a slash", lambda: cluster.session(session_id="a/b")),
    ]


def _raw_requests(vocab: int, rng: random.Random) -> list[tuple[str, StepRequest]]:
    from dualpath_sdk.engine.sequence import SamplingParams

    prompt = [rng.randrange(vocab) for _ in range(24)]
    requests = []
    for name, bad in [
        ("max_tokens", 8.5),
        ("temperature", math.nan),
        ("seed", 2**70),
        ("top_p", 0.0),
        ("stop_token_ids", "abc"),
        ("ignore_eos", "yes"),
        ("max_tokens", 10**9),
    ]:
        params = SamplingParams(max_tokens=2)
        object.__setattr__(params, name, bad)
        requests.append((f"{name}={bad!r}", StepRequest(list(prompt), params, "default", [])))
    good = SamplingParams(max_tokens=2)
    for name, ids in [
        ("token id 10**6", [1, 2, 10**6]),
        ("token id -1", [1, -1, 2]),
        ("a float token id", [1, 2.5, 3]),
        ("a prompt over the DE buffer", [rng.randrange(vocab) for _ in range(BUFFER_SLOTS * BLOCK + 300)]),
    ]:
        requests.append((name, StepRequest(ids, good, "default", [])))  # type: ignore[arg-type]
    return requests


# ---- the scenarios and the rows -----------------------------------------------------------------------

SCENARIOS: dict[str, Callable[[bool, int], Fault]] = {
    "none": lambda q, mb: Fault(q),
    "kill_pe_mid_read": lambda q, mb: KillFault(q, "pe-read", "pe", "kill PE mid-read"),
    "kill_pe_mid_prefill": lambda q, mb: KillFault(q, "prefill", "pe", "kill PE mid-prefill"),
    "kill_de_mid_transfer": lambda q, mb: KillFault(q, "prefill", "de", "kill DE mid-transfer"),
    "kill_de_mid_decode": lambda q, mb: KillFault(q, "decode", "de", "kill DE mid-decode"),
    "corrupt_blocks": lambda q, mb: BlockFault(q, "corrupt", "corrupt blocks"),
    "truncate_blocks": lambda q, mb: BlockFault(q, "truncate", "truncate blocks"),
    "store_read_only": lambda q, mb: ReadOnlyFault(q, mb),
    "poison_requests": lambda q, mb: PoisonFault(q),
}
KILLS = [name for name in SCENARIOS if name.startswith("kill_")]


@dataclass
class Row:
    scenario: str
    title: str
    topology: str
    skipped: str | None = None
    injections: int = 0
    detail: str = ""
    ok: int = 0
    retried: int = 0
    typed: int = 0
    untyped: int = 0
    wrong: int = 0
    changed: int = 0
    bad_restarts: int = 0
    wall_s: float = 0.0
    startup_s: float = 0.0
    gave_up: int = 0
    restarts: dict[str, int] = field(default_factory=dict)
    kinds: dict[str, int] = field(default_factory=dict)
    messages: dict[str, int] = field(default_factory=dict)
    quarantined: int = 0
    persist_failed: int = 0
    cached_tokens: int = 0
    hung: bool = False
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: Figures = field(default_factory=dict)

    @property
    def met(self) -> bool:
        return self.skipped is not None or (
            self.untyped == 0
            and self.wrong == 0
            and self.changed == 0
            and self.bad_restarts == 0
            and not self.hung
        )

    def figures(self) -> Figures:
        out: Figures = {
            "scenario": self.scenario,
            "topology": self.topology,
            "skipped": self.skipped,
            "injections": self.injections,
            "steps_ok": self.ok,
            "retried": self.retried,
            "typed_errors": self.typed,
            "untyped_errors": self.untyped,
            "wrong_tokens": self.wrong,
            "sessions_changed": self.changed,
            "restarts_by_bad_request": self.bad_restarts,
            "wall_s": round(self.wall_s, 1),
            "startup_s": round(self.startup_s, 1),
            "turns_given_up": self.gave_up,
            "engine_restarts": self.restarts,
            "error_kinds": self.kinds,
            "error_messages": self.messages,
            "quarantined_blocks": self.quarantined,
            "persist_failed_blocks": self.persist_failed,
            "cached_tokens": self.cached_tokens,
            "hung": self.hung,
            "targets_met": self.met,
            "notes": self.notes,
        }
        return out | self.extra


def run_scenario(
    scenario: str,
    topology: str,
    primed: Path,
    agents: list[Agent],
    records: dict[str, list[int]],
    refs: References,
    quick: bool,
    scratch: Path,
    deadline_s: float,
) -> Row:
    size_mb = max(256, int(_tree_bytes(primed) / 2**20 * 3) + 96)  # the store and its new blocks
    fault = SCENARIOS[scenario](quick, size_mb)
    row = Row(scenario, fault.title, topology)
    work = scratch / f"{scenario}-{topology}"
    work.mkdir(parents=True)
    try:
        root, skipped = fault.setup(work)
        if root is None:
            row.skipped = skipped
            return row
        shutil.copytree(primed, root)
        p, d = TOPOLOGIES[topology]
        started = time.perf_counter()
        cluster = _start(root, p, d)
        row.startup_s = time.perf_counter() - started
        with cluster:
            _run_in(cluster, root, fault, row, agents, records, refs, quick, deadline_s)
        row.quarantined = len(list((root / "quarantine").glob("*")))
    except Exception as exc:
        row.problems.append(f"the scenario failed: {exc!r}\n{traceback.format_exc()}")
        row.hung = True  # not a result: counts against the targets
    finally:
        fault.teardown()
        shutil.rmtree(work, ignore_errors=True)
    row.problems += fault.problems
    row.notes += fault.notes
    return row


def _start(root: Path, prefill: int, decode: int, cap: float | None = SNIC_BPS) -> Cluster:
    """A cluster on the default model; one retry a minute later (the package may be mid-edit)."""
    for attempt in range(2):
        try:
            return Cluster.local(
                prefill_nodes=prefill,
                decode_nodes=decode,
                store=StoreConfig(root=root, snic_read_bps=cap),
                engine=EngineConfig(block_size=BLOCK, num_blocks=POOL_BLOCKS),
                buffer_slots=BUFFER_SLOTS,
            )
        except DualPathError:
            if attempt == 1:
                raise
            time.sleep(60)
    raise AssertionError("unreachable")


def _run_in(
    cluster: Cluster,
    root: Path,
    fault: Fault,
    row: Row,
    agents: list[Agent],
    records: dict[str, list[int]],
    refs: References,
    quick: bool,
    deadline_s: float,
) -> None:
    runs = [AgentRun(a, list(records[a.name])) for a in agents]
    ctx = Ctx(cluster, root, runs, fault, refs, quick)
    pids = PidWatch(ctx)
    pids.start()
    fault.start(ctx)
    threads = [threading.Thread(target=_drive, args=(ctx, r), name=f"agent-{r.agent.name}") for r in runs]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + deadline_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):
        row.hung = True
        row.problems.append(
            f"HUNG: agents still stepping after {deadline_s:.0f} s: "
            + ", ".join(f"{r.agent.name} turn {r.turn}" for r in runs if not r.finished)
        )
        ctx.stop.set()
        ctx.done.set()
        cluster.close()  # fails the steps in flight; the agents see it and leave
        for thread in threads:
            thread.join(30)
    row.wall_s = time.perf_counter() - started
    ctx.done.set()
    fault.stop(ctx)
    pids.halt.set()
    pids.join(2)
    row.restarts = pids.restarts()
    row.bad_restarts = unplanned_restarts(row.restarts, fault.kills)
    row.injections, row.detail, row.extra = fault.injections, fault.detail, fault.extra
    row.retried = int(ctx.metric("dualpath_step_retries_total"))
    row.persist_failed = int(ctx.metric("dualpath_persist_failed_blocks_total"))
    for r in runs:
        row.ok += r.ok
        row.typed += r.typed
        row.untyped += r.untyped
        row.wrong += r.wrong
        row.changed += r.changed
        row.gave_up += r.gave_up
        row.cached_tokens += r.cached_tokens
        row.problems += r.problems
        for kind, n in r.kinds.items():
            row.kinds[kind] = row.kinds.get(kind, 0) + n
        for message, n in r.messages.items():
            row.messages[message] = row.messages.get(message, 0) + n
    if isinstance(fault, PoisonFault):
        row.changed += fault.outcomes["changed"]
        row.untyped += fault.outcomes["untyped"]


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def prime(root: Path, agents: list[Agent], refs: References) -> tuple[dict[str, list[int]], list[str]]:
    """Every agent's first prompt, once, uncapped, on 1P1D: the store every scenario copies."""
    records: dict[str, list[int]] = {}
    problems: list[str] = []
    lock = threading.Lock()
    with _start(root, 1, 1, cap=None) as cluster:

        def first(agent: Agent) -> None:
            try:
                session = cluster.session(session_id=agent.name)
                result = session.step_tokens(agent.first, max_tokens=GEN, ignore_eos=True)
                with lock:
                    records[agent.name] = session.token_ids
                    expected = refs(agent.first)
                    if list(result.token_ids) != expected:
                        problems.append(
                            f"{agent.name} priming: WRONG TOKENS: expected {expected}, got {result.token_ids}"
                        )
            except Exception as exc:
                with lock:
                    problems.append(f"{agent.name} priming failed: {exc!r}")

        threads = [threading.Thread(target=first, args=(a,)) for a in agents]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return records, problems


# ---- the table and main ----------------------------------------------------------------------------


def _table(console: Console, rows: list[Row]) -> None:
    table = Table(title="faults under concurrent agent sessions (targets: 0 in the last four counts)")
    columns = (
        "scenario",
        "nodes",
        "injections",
        "steps ok",
        "retried",
        "typed errors",
        "untyped",
        "wrong tokens",
        "sessions changed",
        "restarts by bad request",
        "wall s",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "scenario" else "right")
    for r in rows:
        if r.skipped is not None:
            table.add_row(r.title, r.topology, f"skipped: {r.skipped}", *[""] * 8)
            continue
        injections = (
            "-" if r.scenario == "none" else str(r.injections) + (f" ({r.detail})" if r.detail else "")
        )

        def target(n: int) -> str:
            return str(n) if n == 0 else f"[bold red]{n}[/]"

        table.add_row(
            r.title + (" [bold red]HUNG[/]" if r.hung else ""),
            r.topology,
            injections,
            str(r.ok),
            str(r.retried),
            str(r.typed),
            target(r.untyped),
            target(r.wrong),
            target(r.changed),
            target(r.bad_restarts),
            f"{r.wall_s:.1f}",
        )
    console.print(table)
    console.print(
        "retried: the cluster's retries counter; typed errors: DualPathErrors the agents saw (each then "
        "retried the turn, up to 3 times); restarts by bad request: in other rows, restarts beyond one "
        "per kill. wall s: the agents' run, cluster start-up excluded."
    )
    details = Table(title="details")
    for column in (
        "scenario",
        "nodes",
        "error kinds",
        "gave up",
        "restarts",
        "quarantined",
        "persist failed",
        "start s",
    ):
        details.add_column(column, justify="left" if column in ("scenario", "error kinds") else "right")
    for r in rows:
        if r.skipped is None:
            kinds = ", ".join(f"{k} {n}" for k, n in sorted(r.kinds.items())) or "-"
            if "poison" in r.extra:
                kinds += " | poison: " + ", ".join(f"{k} {n}" for k, n in sorted(r.extra["poison"].items()))
            restarts = ", ".join(f"{e} {n}" for e, n in sorted(r.restarts.items()) if n) or "0"
            details.add_row(
                r.title,
                r.topology,
                kinds,
                str(r.gave_up),
                restarts,
                str(r.quarantined),
                str(r.persist_failed),
                f"{r.startup_s:.1f}",
            )
    console.print(details)
    for r in rows:
        for note in r.notes:
            if not note.startswith("killed "):
                console.print(f"note ({r.title}, {r.topology}): {note}")
        for problem in r.problems:
            console.print(
                f"[bold red]problem[/] ({r.title}, {r.topology}): {problem}", markup=True, highlight=False
            )


def main(quick: bool) -> Figures:
    torch.set_num_threads(1)
    console = Console(width=None if sys.stdout.isatty() else 180)
    n, turns = (4, 3) if quick else (8, 6)
    topologies = ("1P1D",) if quick else tuple(TOPOLOGIES)
    deadline_s = 420.0 if quick else 900.0
    figures: Figures = {
        "sessions": n,
        "turns": turns,
        "gen": GEN,
        "snic_mb_s": SNIC_BPS / 1e6,
        "topologies": list(topologies),
        "skipped": "1P2D (the quick run keeps 1P1D only)" if quick else None,
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dualpath-bench-faults-") as tmp:
        scratch = Path(tmp)
        refs = References()
        from transformers import AutoConfig

        from dualpath_sdk.model.loader import default_model_dir

        vocab = int(AutoConfig.from_pretrained(default_model_dir()).vocab_size)
        agents = workload(n, turns, vocab)
        t = time.perf_counter()
        for agent in agents:
            refs.history(agent, turns)
        console.print(f"references: {len(refs.cache)} prompts in {time.perf_counter() - t:.1f} s")
        primed = scratch / "primed"
        t = time.perf_counter()
        records, prime_problems = prime(primed, agents, refs)
        console.print(f"primed {n} sessions in {time.perf_counter() - t:.1f} s")
        for problem in prime_problems:
            console.print(f"[bold red]problem[/] (priming): {problem}")
        figures["priming_problems"] = prime_problems
        if len(records) < n:
            figures["all_targets_met"] = False
            return figures
        rows: list[Row] = []
        for topology in topologies:
            for scenario in SCENARIOS:
                t = time.perf_counter()
                row = run_scenario(
                    scenario, topology, primed, agents, records, refs, quick, scratch, deadline_s
                )
                rows.append(row)
                state = (
                    f"skipped ({row.skipped})" if row.skipped else f"{row.ok} ok, {row.typed} typed errors"
                )
                console.print(
                    f"{row.title} {topology}: {state}, {row.injections} injections, "
                    f"{time.perf_counter() - t:.1f} s with start-up"
                    + ("" if row.met else " [bold red]TARGETS MISSED[/]")
                )
    _table(console, rows)
    for r in rows:
        figures[f"{r.scenario}_{r.topology}"] = r.figures()
    figures["problems"] = [
        f"{r.scenario} {r.topology}: {p}" for r in rows for p in r.problems
    ] + prime_problems
    figures["all_targets_met"] = not prime_problems and all(r.met for r in rows)
    figures["total_s"] = round(time.perf_counter() - started, 1)
    console.print(f"all targets met: {figures['all_targets_met']} ({figures['total_s']:.0f} s in all)")
    return figures
