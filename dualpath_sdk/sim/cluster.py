"""The simulated cluster: nodes, PE and DE engines, storage reads, and one request's life.

Arrival -> global FIFO -> PE choice -> DE group (level 1) -> DE engine (level 2, memory reserved) -> read
plan -> storage reads into the PE and/or DE buffer -> PE batch (compute-quota packed, layer-wise: loads,
compute and sends overlap) -> DE buffer -> DE GPU -> decode -> the agent's next call. Every decision is
made by `dualpath_sdk.scheduler.Scheduler`, fed the same engine reports a cluster leader would send.
Events are per request and per batch, never per token: decode advances a virtual step clock per engine.
A call's cached prefix is its history in whole blocks, as in the paper, whose store is a trie of Full
Blocks; the SDK also reloads a history's trailing partial block (store/prefix.py), but this simulator
reproduces the paper's system and figures, so it recomputes that tail: at most 63 more tokens to
prefill and 63 fewer to read per call, beside its hundreds of appended tokens and tens of thousands
read, which changes neither the storage-bound picture nor the ratios.
"""

from __future__ import annotations

import heapq
import itertools
import math
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from dualpath_sdk.config import Mode, SchedulerConfig
from dualpath_sdk.scheduler import (
    AttentionModel,
    EngineReport,
    PrefillWork,
    Request,
    Scheduler,
    derive_thresholds,
    fit_attention_model,
)
from dualpath_sdk.sim.core import KV, MODEL, EventLoop, Job, Link
from dualpath_sdk.sim.presets import Model, Preset
from dualpath_sdk.sim.ranking import Ranking
from dualpath_sdk.sim.workload import Trajectories


class SimRequest:
    """One LLM call of one agent."""

    __slots__ = (
        "agent",
        "arrival",
        "cached",
        "call",
        "de",
        "de_tok",
        "done",
        "gen",
        "pe",
        "pe_tok",
        "sreq",
        "t_first",
        "t_join",
        "t_read",
        "t_ready",
        "tokens",
    )

    def __init__(self, agent: int, call: int, tokens: int, cached: int, gen: int) -> None:
        self.agent = agent
        self.call = call
        self.tokens = tokens
        self.cached = cached
        self.gen = gen
        self.sreq = Request(self, tokens, cached, gen)
        self.arrival = 0.0
        self.t_first = 0.0
        self.t_join = 0.0
        self.t_read = 0.0  # PE and DE chosen: the storage read starts
        self.t_ready = 0.0  # the read is done: the request waits for its PE's batch
        self.done = 0  # new tokens prefilled so far (chunked prefill)
        self.pe_tok = 0
        self.de_tok = 0
        self.pe: PrefillEngine
        self.de: DecodeEngine


class Node:
    __slots__ = (
        "de_queue",
        "dram",
        "engines",
        "group_tok",
        "idx",
        "low",
        "pes",
        "pos",
        "read_q",
        "role",
        "snic",
    )

    def __init__(self, loop: EventLoop, idx: int, role: str, snic_bps: float, dram_bps: float) -> None:
        self.idx = idx
        self.role = role
        self.snic = Link(loop, f"n{idx}.snic", snic_bps)
        self.dram = Link(loop, f"n{idx}.dram", dram_bps)
        self.read_q = 0  # tokens queued or in flight on this node's SNIC
        self.group_tok = 0  # DE group: tokens of its unfinished requests (level-1 load)
        self.de_queue: deque[SimRequest] = deque()
        self.engines: list[DecodeEngine] = []
        self.pes: list[PrefillEngine] = []
        self.low = True  # read_q <= alpha (the PE choice prefers such nodes)
        self.pos = 0  # position among the DE groups (level-1 tie order)


class PrefillEngine:
    __slots__ = (
        "batch",
        "busy",
        "cnic_in",
        "cnic_out",
        "compute_s",
        "idx",
        "node",
        "order",
        "ready",
        "seq_e",
        "tok_e",
    )

    def __init__(self, idx: int, node: Node, cnic_in: Link, cnic_out: Link) -> None:
        self.idx = idx
        self.node = node
        self.cnic_in = cnic_in
        self.cnic_out = cnic_out
        self.ready: deque[SimRequest] = deque()
        self.tok_e = 0
        self.seq_e = 0
        self.busy = False
        self.batch: list[tuple[SimRequest, int]] = []
        self.compute_s = 0.0
        self.order = idx  # position in the report list (under_beta insertion order)


class DecodeEngine:
    """Continuous batching as a fluid: `steps` advances at 1/step_s; a request leaves after its steps."""

    __slots__ = (
        "attended",
        "cnic_in",
        "cnic_out",
        "free",
        "heap",
        "idx",
        "last",
        "n",
        "node",
        "seq_e",
        "step_s",
        "steps",
        "tok_e",
        "version",
    )

    def __init__(self, idx: int, node: Node, cnic_in: Link, cnic_out: Link, free: int) -> None:
        self.idx = idx
        self.node = node
        self.cnic_in = cnic_in
        self.cnic_out = cnic_out
        self.free = free
        self.tok_e = 0
        self.seq_e = 0
        self.steps = 0.0
        self.last = 0.0
        self.step_s = 0.0
        self.n = 0
        self.attended = 0.0  # KV bytes one decode step reads for the whole batch
        self.heap: list[tuple[float, int, SimRequest]] = []
        self.version = 0


@dataclass
class Metrics:
    arrival: array = field(default_factory=lambda: array("d"))
    ttft: array = field(default_factory=lambda: array("d"))
    tpot: array = field(default_factory=lambda: array("d"))
    read: array = field(default_factory=lambda: array("d"))  # KV read time of each call (s)
    plans: dict[str, int] = field(default_factory=lambda: {"none": 0, "pe": 0, "de": 0, "split": 0})
    read_tokens_pe: int = 0
    read_tokens_de: int = 0
    persisted_bytes: float = 0.0
    agents_done: int = 0
    last_done: float = 0.0


class ModelCost:
    """FLOP- and byte-based costs of one model on one engine (PAPER.md: compute from FLOPs)."""

    def __init__(self, model: Model, flops: float, hbm_bps: float) -> None:
        self.m = model
        self.flops = flops * model.gpus_per_engine
        self.hbm = hbm_bps * model.gpus_per_engine
        self.kv = model.kv_bytes_per_token
        self.step_base = model.decode_overhead_s + model.weight_bytes / (model.weight_gpus * hbm_bps)
        self.per_seq = 2 * model.active_params / self.flops

    def attention_flops(self, ctx: int, new: int) -> float:
        mean_ctx = ctx + new / 2
        keys = min(mean_ctx, self.m.attn_topk) if self.m.attn_topk else mean_ctx
        return new * (self.m.attn_flops_per_pair * keys + self.m.index_flops_per_pair * mean_ctx)

    def prefill_s(self, ctx: int, new: int) -> float:
        return (2 * self.m.active_params * new + self.attention_flops(ctx, new)) / self.flops

    def decode_read_bytes(self, ctx: int) -> float:
        keys = min(ctx, self.m.attn_topk) if self.m.attn_topk else ctx
        return keys * self.kv + ctx * self.m.index_bytes_per_token

    def step_s(self, n: int, attended: float) -> float:
        return self.step_base + n * self.per_seq + attended / self.hbm


class Simulation:
    def __init__(
        self,
        preset: Preset,
        mode: Mode,
        traj: Trajectories,
        starts: np.ndarray,
        config: SchedulerConfig | None = None,
        block_tokens: int = 64,
        stop_calls_at: float = math.inf,
        check_fast_paths: bool = False,
    ) -> None:
        hw, model = preset.hardware, preset.model
        self.preset = preset
        self.loop = EventLoop()
        self.cost = ModelCost(model, hw.gpu_flops, hw.hbm_bps)
        self.bt = block_tokens
        self.kv = model.kv_bytes_per_token
        self.layers = model.layers
        self.model_bytes = model.model_bytes_per_token
        self.stop_calls_at = stop_calls_at
        self.first_prompt = traj.first_prompt.tolist()
        self.append = traj.append.tolist()
        self.gen = traj.gen.tolist()
        self.calls = traj.append.shape[1]
        self.starts = starts.tolist()
        self.metrics = Metrics()
        self.queue: deque[SimRequest] = deque()
        self._pending = False
        self._dirty: dict[int, Node] = {}
        self._seq = itertools.count()

        cfg = config or SchedulerConfig()
        self.snic_tok_rate = hw.snic_bps / self.kv
        self.sched = Scheduler(
            cfg,
            derive_thresholds(cfg, self.snic_tok_rate, self._prefill_rate(traj)),
            self._fit_attention(),
            mode,
        )
        self.skips_io = self.sched.skips_io
        self.beta = self.sched.thresholds.beta
        self.alpha = self.sched.thresholds.alpha
        # dualpath/oracle: hand the scheduler only the engines/groups it could pick (see ranking.py);
        # check_fast_paths also asks it with every report and asserts the same answer (tests).
        self.fast = mode != "basic"
        self.check_fast_paths = check_fast_paths and self.fast  # basic's round-robin cursors move on asking
        self.narrowed = 0  # check_fast_paths: passes that gave the scheduler less than everything

        engines_per_node = hw.gpus_per_node // model.gpus_per_engine
        cnic = hw.cnic_bps * model.gpus_per_engine
        free = int(
            (
                hw.hbm_bytes * model.gpus_per_engine
                - model.weight_bytes * model.gpus_per_engine / model.weight_gpus
                - 10e9
            )
            / self.kv
        )
        self.nodes: list[Node] = []
        self.pes: list[PrefillEngine] = []
        self.des: list[DecodeEngine] = []
        for i in range(preset.pe_nodes + preset.de_nodes):
            role = "pe" if i < preset.pe_nodes else "de"
            node = Node(self.loop, i, role, hw.snic_bps, hw.dram_bps)
            self.nodes.append(node)
            for g in range(engines_per_node):
                cin = Link(self.loop, f"n{i}.g{g}.in", cnic, hw.model_share)
                cout = Link(self.loop, f"n{i}.g{g}.out", cnic, hw.model_share)
                if role == "pe":
                    pe = PrefillEngine(len(self.pes), node, cin, cout)
                    self.pes.append(pe)
                    node.pes.append(pe)
                else:
                    de = DecodeEngine(len(self.des), node, cin, cout, free)
                    self.des.append(de)
                    node.engines.append(de)
        self.de_nodes = [n for n in self.nodes if n.role == "de"]
        for pos, node in enumerate(self.de_nodes):
            node.pos = pos
        self.under_beta: dict[int, PrefillEngine] = {e.idx: e for e in self.pes}
        self._order = itertools.count(len(self.pes))
        self.pe_rank = Ranking(len(self.pes), 2)  # class 0: node read_q <= alpha, 1: above
        self.group_rank = Ranking(len(self.nodes), 1)

    # --- profiling, as a deployment would measure before serving ---------------------------------------

    def _prefill_rate(self, traj: Trajectories) -> float:
        """len(r)-tokens per second one PE prefills on this workload (tok_e counts len(r), so beta must)."""
        ctx = int(traj.first_prompt.mean()) + int((traj.append + traj.gen).sum(axis=1).mean()) // 2
        new = int(traj.append.mean()) + self.bt // 2
        return ctx / self.cost.prefill_s(ctx, new)

    def _fit_attention(self) -> AttentionModel:
        samples = [
            (c, n, self.cost.attention_flops(c, n) / self.cost.flops)
            for c in (0, 4096, 16384, 32768, 65536)
            for n in (64, 512, 2048, 8192)
        ]
        return fit_attention_model(samples)

    # --- run ---------------------------------------------------------------------------------------------

    def run(self) -> Metrics:
        for node in self.nodes:
            node.low = node.read_q <= self.alpha
        for e in self.pes:
            self._rank_pe(e)
        for node in self.de_nodes:
            self.group_rank.put(0, node.idx, node.group_tok, node.pos)
        for agent, t in enumerate(self.starts):
            self.loop.at(t, self._arrive, self._call(agent, 0, 0, 0))
        self.loop.run()
        return self.metrics

    def _call(self, agent: int, call: int, prev_tokens: int, prev_gen: int) -> SimRequest:
        if call == 0:
            return SimRequest(agent, 0, self.first_prompt[agent], 0, self.gen[agent][0])
        history = prev_tokens + prev_gen
        return SimRequest(
            agent,
            call,
            history + self.append[agent][call],
            history // self.bt * self.bt,  # whole blocks: the paper's cache (module docstring)
            self.gen[agent][call],
        )

    def _arrive(self, r: SimRequest) -> None:
        r.arrival = self.loop.now
        self.queue.append(r)
        self._kick()

    def _kick(self) -> None:
        if not self._pending:
            self._pending = True
            self.loop.at(self.loop.now, self._schedule)

    # --- scheduling --------------------------------------------------------------------------------------

    def _schedule(self, _: object) -> None:
        self._pending = False
        if self.queue and self.under_beta:
            engines = self._pe_candidates(len(self.queue)) if self.fast else list(self.under_beta.values())
            placements = self.sched.choose_pe(self._queued(), self._pe_reports(engines))
            if self.check_fast_paths:
                self.narrowed += len(engines) < len(self.under_beta)
                full = self.sched.choose_pe(self._queued(), self._pe_reports(self.under_beta.values()))
                assert [p.engine_id for p in full] == [p.engine_id for p in placements]
            placed: list[SimRequest] = []
            for p in placements:
                r = self.queue.popleft()
                e = self.pes[cast(int, p.engine_id)]
                r.pe = e
                e.tok_e += r.tokens
                e.seq_e += 1
                if e.tok_e > self.beta:
                    del self.under_beta[e.idx]
                if self.fast:
                    self._rank_pe(e)
                placed.append(r)
            if placed:
                self._place_groups(placed)
        dirty, self._dirty = self._dirty, {}
        for node in dirty.values():
            if node.de_queue:
                self._place_de(node)

    @staticmethod
    def _pe_reports(engines: Iterable[PrefillEngine]) -> list[EngineReport]:
        return [EngineReport(e.idx, e.node.idx, "pe", e.seq_e, e.tok_e, e.node.read_q, 0) for e in engines]

    def _pe_candidates(self, k: int) -> list[PrefillEngine]:
        """The k least-loaded engines under beta of each read_q class, in report (under_beta) order."""
        rank = self.pe_rank
        cands = rank.smallest(0, k) + rank.smallest(1, k)
        cands.sort(key=lambda c: c[1])
        return [self.pes[c[2]] for c in cands]

    def _rank_pe(self, e: PrefillEngine) -> None:
        if e.idx in self.under_beta:
            self.pe_rank.put(0 if e.node.low else 1, e.idx, e.tok_e, e.order)
        else:
            self.pe_rank.remove(e.idx)

    def _place_groups(self, placed: list[SimRequest]) -> None:
        """DE choice level 1; with `fast`, only the len(placed) least-loaded groups can be picked."""
        if self.fast:
            cands = self.group_rank.smallest(0, len(placed))
            cands.sort(key=lambda c: c[1])
            groups = {c[2]: self.nodes[c[2]].group_tok for c in cands}
        else:
            groups = {n.idx: n.group_tok for n in self.de_nodes}
        chosen = self.sched.choose_de_group((r.sreq for r in placed), groups)
        if self.check_fast_paths:
            full = self.sched.choose_de_group(
                (r.sreq for r in placed), {n.idx: n.group_tok for n in self.de_nodes}
            )
            assert [g for _, g in full] == [g for _, g in chosen]
        for sreq, g in chosen:
            node = self.nodes[g]
            node.group_tok += sreq.tokens
            if self.fast:
                self.group_rank.put(0, node.idx, node.group_tok, node.pos)
            node.de_queue.append(cast(SimRequest, sreq.request_id))
            self._dirty[node.idx] = node

    def _add_read_q(self, node: Node, tokens: int) -> None:
        node.read_q += tokens
        low = node.read_q <= self.alpha
        if low != node.low:
            node.low = low
            if self.fast:
                for e in node.pes:
                    self._rank_pe(e)

    def _queued(self) -> Iterator[Request]:
        for r in self.queue:
            yield r.sreq

    @staticmethod
    def _de_reports(node: Node) -> list[EngineReport]:
        return [
            EngineReport(e.idx, node.idx, "de", e.seq_e, e.tok_e, node.read_q, e.free) for e in node.engines
        ]

    def _place_de(self, node: Node) -> None:
        """DE choice level 2 on the group's queue prefix the scheduler can reach.

        The scheduler places requests in order and stops at the first one no engine has memory for; every
        placed request lies in R (the prefix that fits the group's free memory), so R and the request after
        it are all it reads. When the head fits no engine nothing is placed, so it is not asked at all.
        """
        queue = node.de_queue
        free = [e.free for e in node.engines]
        head = queue[0]
        if head.tokens + head.gen > max(free):
            if self.check_fast_paths:
                assert not self.sched.choose_de([head.sreq], self._de_reports(node))
            return
        room = sum(free)
        n = 0
        for r in queue:
            n += 1
            room -= r.tokens + r.gen
            if room < 0:
                break
        reports = self._de_reports(node)
        placements = self.sched.choose_de([r.sreq for r in itertools.islice(queue, n)], reports)
        if self.check_fast_paths:
            self.narrowed += n < len(queue)
            full = self.sched.choose_de([r.sreq for r in queue], reports)
            assert [p.engine_id for p in full] == [p.engine_id for p in placements]
        for p in placements:
            r = queue.popleft()
            de = self.des[cast(int, p.engine_id)]
            de.free -= r.tokens + r.gen
            de.tok_e += r.tokens
            de.seq_e += 1
            r.de = de
            self._start_read(r)

    # --- storage reads -----------------------------------------------------------------------------------

    def _start_read(self, r: SimRequest) -> None:
        r.t_read = self.loop.now
        blocks = r.cached // self.bt
        pe_node, de_node = r.pe.node, r.de.node
        plan = self.sched.plan_read(
            blocks, self.bt, pe_node.read_q, de_node.read_q, self.snic_tok_rate, self.snic_tok_rate
        )
        if self.skips_io or plan.kind == "none":
            self.metrics.plans["none"] += 1
            self._read_done(r)
            return
        self.metrics.plans[plan.kind] += 1
        r.pe_tok = plan.pe_blocks * self.bt
        r.de_tok = plan.de_blocks * self.bt
        self.metrics.read_tokens_pe += r.pe_tok
        self.metrics.read_tokens_de += r.de_tok
        job = Job(self._read_done, r)
        for node, tok in ((pe_node, r.pe_tok), (de_node, r.de_tok)):
            if tok:
                self._add_read_q(node, tok)
                node.snic.add(tok * self.kv, KV, job)
                node.dram.add(tok * self.kv, KV, job)
        job.start()

    def _read_done(self, r: SimRequest) -> None:
        r.t_ready = self.loop.now
        if r.pe_tok:
            self._add_read_q(r.pe.node, -r.pe_tok)
        if r.de_tok:
            self._add_read_q(r.de.node, -r.de_tok)
        r.pe.ready.append(r)
        self._try_prefill(r.pe)

    # --- prefill -----------------------------------------------------------------------------------------

    def _try_prefill(self, e: PrefillEngine) -> None:
        if e.busy or not e.ready:
            return
        work = (PrefillWork(r, r.cached + r.done, r.tokens - r.cached - r.done) for r in e.ready)
        e.batch = [(cast(SimRequest, c.request_id), c.tokens) for c in self.sched.batch_prefill(work)]
        e.busy = True
        e.compute_s = self.preset.model.prefill_overhead_s + sum(
            self.cost.prefill_s(r.cached + r.done, n) for r, n in e.batch
        )
        if self.sched.layerwise:
            self._launch(e, True, True, True, self._after_layers)
        else:
            self._launch(e, True, False, False, self._basic_compute)

    def _basic_compute(self, e: PrefillEngine) -> None:
        self._launch(e, False, True, False, self._basic_send)

    def _basic_send(self, e: PrefillEngine) -> None:
        self._launch(e, False, False, True, self._batch_end)

    def _after_layers(self, e: PrefillEngine) -> None:
        """Pipeline fill: the first layer's load precedes compute and the last layer's send follows it."""
        self.loop.at(self.loop.now + e.compute_s / self.layers, self._batch_end, e)

    def _launch(
        self, e: PrefillEngine, load: bool, compute: bool, send: bool, then: Callable[[PrefillEngine], None]
    ) -> None:
        """Start the loads into the PE GPU, its compute (and model traffic), and/or the sends to DEs.

        Only this batch moves KV through the PE's own CNIC (one batch at a time per PE), so its per-request
        loads (sends) there are one flow: the link is work-conserving, so the last of them would end at the
        same moment, and the model class's share does not depend on how many KV flows there are.
        """
        job = Job(then, e)
        kv = self.kv
        io = not self.skips_io
        if load and io:
            local = loads = 0
            for r, _ in e.batch:
                local += r.pe_tok + r.done
                loads += r.pe_tok + r.done + r.de_tok
                if r.de_tok:
                    r.de.cnic_out.add(r.de_tok * kv, KV, job)
                    r.de.node.dram.add(r.de_tok * kv, KV, job)
            e.cnic_in.add(loads * kv, KV, job)
            e.node.dram.add(local * kv, KV, job)
        if compute:
            new = sum(n for _, n in e.batch)
            e.cnic_in.add(new * self.model_bytes, MODEL, job)
            e.cnic_out.add(new * self.model_bytes, MODEL, job)
            job.left += 1
            self.loop.at(self.loop.now + e.compute_s, job.done)
        if send and io:
            sends = 0.0
            for r, n in e.batch:
                out = (n + (r.pe_tok if r.done == 0 else 0)) * kv
                sends += out
                r.de.cnic_in.add(out, KV, job)
                r.de.node.dram.add(out, KV, job)
            e.cnic_out.add(sends, KV, job)
        job.start()

    def _batch_end(self, e: PrefillEngine) -> None:
        now = self.loop.now
        for r, n in e.batch:
            r.done += n
            if r.cached + r.done == r.tokens:
                e.ready.popleft()
                e.tok_e -= r.tokens
                e.seq_e -= 1
                r.t_first = now
                self._handoff(r)
        e.busy = False
        if e.tok_e <= self.beta and e.idx not in self.under_beta:
            self.under_beta[e.idx] = e
            e.order = next(self._order)
            if self.queue:
                self._kick()
        if self.fast:
            self._rank_pe(e)
        self._try_prefill(e)

    # --- decode ------------------------------------------------------------------------------------------

    def _handoff(self, r: SimRequest) -> None:
        """DE buffer -> DE GPU, once, through the DE GPU's own CNIC."""
        if self.skips_io:
            self._join(r)
            return
        job = Job(self._join, r)
        r.de.cnic_in.add(r.tokens * self.kv, KV, job)
        r.de.node.dram.add(r.tokens * self.kv, KV, job)
        job.start()

    def _join(self, r: SimRequest) -> None:
        de = self._advance(r.de)
        r.t_join = self.loop.now
        heapq.heappush(de.heap, (de.steps + max(r.gen - 1, 0), next(self._seq), r))
        de.n += 1
        de.attended += self.cost.decode_read_bytes(r.tokens)
        self._reschedule(de)

    def _advance(self, de: DecodeEngine) -> DecodeEngine:
        now = self.loop.now
        if de.n:
            de.steps += (now - de.last) / de.step_s
        de.last = now
        return de

    def _reschedule(self, de: DecodeEngine) -> None:
        de.version += 1
        if not de.n:
            return
        de.step_s = self.cost.step_s(de.n, de.attended)
        wait = max(de.heap[0][0] - de.steps, 0.0) * de.step_s
        self.loop.at(self.loop.now + wait, self._decode_event, (de, de.version))

    def _decode_event(self, arg: tuple[DecodeEngine, int]) -> None:
        de, version = arg
        if version != de.version:
            return
        self._advance(de)
        finished: list[SimRequest] = []
        eps = 1e-9 * (1.0 + self.loop.now) / de.step_s  # see Link._on_finish: float clocks stall
        while de.heap and de.heap[0][0] <= de.steps + eps:
            r = heapq.heappop(de.heap)[2]
            de.n -= 1
            de.attended -= self.cost.decode_read_bytes(r.tokens)
            finished.append(r)
        self._reschedule(de)
        for r in finished:
            self._finish(r)

    def _finish(self, r: SimRequest) -> None:
        now = self.loop.now
        de = r.de
        de.free += r.tokens + r.gen
        de.tok_e -= r.tokens
        de.seq_e -= 1
        de.node.group_tok -= r.tokens
        if self.fast:
            self.group_rank.put(0, de.node.idx, de.node.group_tok, de.node.pos)
        self._dirty[de.node.idx] = de.node
        m = self.metrics
        m.arrival.append(r.arrival)
        m.ttft.append(r.t_first - r.arrival)
        m.read.append(r.t_ready - r.t_read)
        m.tpot.append((now - r.t_join) / (r.gen - 1) if r.gen > 1 else 0.0)
        m.persisted_bytes += ((r.tokens + r.gen) // self.bt * self.bt - r.cached) * self.kv
        if r.call + 1 < self.calls and now < self.stop_calls_at:
            self._arrive(self._call(r.agent, r.call + 1, r.tokens, r.gen))
        else:
            m.agents_done += 1
            m.last_done = now
        self._kick()
