"""The simulated cluster: one request's life as events, every decision made by the placement pipeline.

Arrival -> global FIFO -> `scheduler.Pipeline` (PE choice -> DE group -> DE engine, memory reserved ->
read plan), fed the reports a cluster leader would send (candidates.py) -> storage reads into the PE
and/or DE buffer -> PE batch (compute-quota packed, layer-wise: loads, compute and sends overlap) -> DE
buffer -> DE GPU -> decode -> the agent's next call.
Events are per request and per batch, never per token: decode advances a virtual step clock per engine.
A call's cached prefix is its history in whole blocks, as in the paper, whose store is a trie of Full
Blocks; the SDK also reloads a history's trailing partial block (store/prefix.py), but this simulator
reproduces the paper's system and figures, so it recomputes that tail: at most 63 more tokens to
prefill and 63 fewer to read per call, beside its hundreds of appended tokens and tens of thousands
read, which changes neither the storage-bound picture nor the ratios.
"""

from __future__ import annotations

import gc
import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import numpy as np

from dualpath_sdk.config import Mode, SchedulerConfig
from dualpath_sdk.scheduler import Decision, Pipeline, PrefillWork, Request, Scheduler, derive_thresholds
from dualpath_sdk.sim.ablation import AblationScheduler, Features
from dualpath_sdk.sim.balance import Balance
from dualpath_sdk.sim.candidates import SimReports
from dualpath_sdk.sim.core import KV, MODEL, EventLoop, Job
from dualpath_sdk.sim.costs import ModelCost
from dualpath_sdk.sim.engines import DecodeEngine, PrefillEngine, SimRequest, build
from dualpath_sdk.sim.metrics import Metrics
from dualpath_sdk.sim.presets import Preset
from dualpath_sdk.sim.store import SessionStore
from dualpath_sdk.sim.workload import Trajectories


@dataclass(frozen=True, slots=True)
class Options:
    """What a run adds to the paper's setup; the defaults are the paper's (and change nothing).

    `features`: an ablation step (ablation.py) instead of the mode's own parts. `tool_latency_s`: the gap
    between a call's end and the agent's next call. `storage_blocks`: KV storage capacity in blocks (None:
    unbounded, the paper's), with session pins lasting `pin_ttl_s` after each call (0: none; 3600 s is the
    SDK's default session TTL). `working_set`: track the KV the agents' histories hold. `sample_s`: the
    window of the load-balance figures (balance.py; 0: off).
    """

    features: Features | None = None
    tool_latency_s: float = 0.0
    storage_blocks: int | None = None
    pin_ttl_s: float = 3600.0
    working_set: bool = False
    sample_s: float = 0.0


PAPER_SETUP = Options()


class Simulation:
    """One run: the preset's cluster, the mode's scheduler, and agents whose first calls arrive at `starts`;
    agents make no new call after `stop_calls_at` (online runs drain)."""

    def __init__(
        self,
        preset: Preset,
        mode: Mode,
        traj: Trajectories,
        starts: np.ndarray,
        config: SchedulerConfig | None = None,
        block_tokens: int = 64,
        stop_calls_at: float = math.inf,
        options: Options = PAPER_SETUP,
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
        self.queue: deque[Request] = deque()  # the global FIFO queue
        self._pending = False
        self._dirty: dict[int, None] = {}  # DE groups whose memory was freed since the last pass
        self._seq = itertools.count()
        self._unplaced: dict[int, SimRequest] = {}  # calls by agent, from their creation to their DE choice
        self.options = options
        self.tool_latency_s = options.tool_latency_s
        agents = len(self.starts)
        self.store = (
            None
            if options.storage_blocks is None
            else SessionStore(agents, options.storage_blocks, options.pin_ttl_s)
        )
        self._history = [0] * agents if options.working_set or self.store else None

        cfg = config or SchedulerConfig()
        snic_tok_rate = hw.snic_bps / self.kv
        prefill_rate = self.cost.prefill_rate(traj, block_tokens)
        thresholds = derive_thresholds(cfg, snic_tok_rate, prefill_rate)
        features = options.features
        if features is None:
            self.scheduler = Scheduler(cfg, thresholds, self.cost.attention_model(), mode)
        else:
            self.scheduler = AblationScheduler(cfg, thresholds, self.cost.attention_model(), features)
        self.pipeline = Pipeline(self.scheduler, block_tokens, snic_tok_rate)
        self.skips_io = self.scheduler.skips_io

        self.nodes, self.pes, self.des = build(self.loop, preset)
        # dualpath and oracle pick by argmin, so the pipeline needs only the candidates that can win
        narrow = features.scheduler if features else mode != "basic"
        self.reports = SimReports(self.nodes, self.pes, self.queue, thresholds.alpha, thresholds.beta, narrow)
        self.balance = Balance(self, options.sample_s) if options.sample_s > 0 else None

    # --- run ---------------------------------------------------------------------------------------------

    def run(self) -> Metrics:
        self.reports.start()
        if self.balance:
            self.balance.start()
        for agent, t in enumerate(self.starts):
            self.loop.at(t, self._arrive, self._call(agent, 0, 0, 0))
        # What exists now lives all run (the trajectories alone are agents x calls ints): frozen, the
        # collector's full passes skip it instead of walking it again.
        gc.freeze()
        try:
            self.loop.run()
        finally:
            gc.unfreeze()
        return self.metrics

    def _call(self, agent: int, call: int, prev_tokens: int, prev_gen: int) -> SimRequest:
        if call == 0:
            tokens, cached = self.first_prompt[agent], 0
        else:
            history = prev_tokens + prev_gen
            tokens = history + self.append[agent][call]
            cached = history // self.bt * self.bt  # whole blocks: the paper's cache (module docstring)
        if self.store:
            m = self.metrics
            m.prompt_tokens += tokens
            m.history_tokens += cached
            cached = self.store.lookup(agent, cached // self.bt) * self.bt
            m.hit_tokens += cached
        r = self._unplaced[agent] = SimRequest(agent, call, tokens, cached, self.gen[agent][call])
        return r

    def _next_call(self, arg: tuple[int, int, int, int]) -> None:
        """The agent's tool ran `tool_latency_s`: its next call arrives."""
        self._arrive(self._call(*arg))

    def _arrive(self, r: SimRequest) -> None:
        r.arrival = self.loop.now
        self.queue.append(r.request)
        self._kick()

    def _kick(self) -> None:
        if not self._pending:
            self._pending = True
            self.loop.at(self.loop.now, self._schedule)

    # --- scheduling --------------------------------------------------------------------------------------

    def _schedule(self, _: object) -> None:
        """One pipeline pass, applied: PEs and groups charged, group queues moved on, reads started."""
        self._pending = False
        changed, self._dirty = self._dirty, {}
        reports = self.reports
        if reports.idle(changed):
            return
        done = self.pipeline.place(self.queue, reports, changed)
        now = self.loop.now
        for w in done.fetched:
            r = self._unplaced[cast(int, self.queue.popleft().request_id)]
            r.t_fetch = now
            e = r.pe = self.pes[cast(int, w.pe)]
            e.tok_e += r.tokens
            e.seq_e += 1
            reports.pe_changed(e)
            node = self.nodes[cast(int, w.group)]
            node.group_tok += r.tokens
            reports.group_changed(node)
            node.de_queue.append(w)
        for d in done.admitted:
            r = self._unplaced.pop(cast(int, d.request.request_id))
            de = r.de = self.des[cast(int, d.de)]
            de.node.de_queue.popleft()
            need = r.tokens + r.gen
            if need > de.free:  # only an idle DE is handed a request bigger than its memory
                raise ValueError(f"a call of {need} tokens exceeds a decode engine's KV memory ({de.free})")
            de.free -= need
            de.tok_e += r.tokens
            de.seq_e += 1
            self._start_read(r, d)

    # --- storage reads -----------------------------------------------------------------------------------

    def _start_read(self, r: SimRequest, d: Decision) -> None:
        r.t_read = self.loop.now
        if self.skips_io or d.plan.kind == "none":
            self.metrics.plans["none"] += 1
            self._read_done(r)
            return
        self.metrics.plans[d.plan.kind] += 1
        r.pe_tok, r.de_tok = d.pe_tokens, d.de_tokens
        self.metrics.read_tokens_pe += r.pe_tok
        self.metrics.read_tokens_de += r.de_tok
        job = Job(self._read_done, r)
        for node, tok in ((r.pe.node, r.pe_tok), (r.de.node, r.de_tok)):
            if tok:
                self.reports.add_read_q(node, tok)
                node.snic.add(tok * self.kv, KV, job)
                node.dram.add(tok * self.kv, KV, job)
        job.start()

    def _read_done(self, r: SimRequest) -> None:
        r.t_ready = self.loop.now
        if self.store and r.call:
            self.store.read_done(r.agent, r.t_ready)
        if r.pe_tok:
            self.reports.add_read_q(r.pe.node, -r.pe_tok)
        if r.de_tok:
            self.reports.add_read_q(r.de.node, -r.de_tok)
        r.pe.ready.append(r)
        self._try_prefill(r.pe)

    # --- prefill -----------------------------------------------------------------------------------------

    def _try_prefill(self, e: PrefillEngine) -> None:
        if e.busy or not e.ready:
            return
        work = (PrefillWork(r, r.cached + r.done, r.tokens - r.cached - r.done) for r in e.ready)
        e.batch = [(cast(SimRequest, c.request_id), c.tokens) for c in self.scheduler.batch_prefill(work)]
        e.busy = True
        e.compute_s = self.preset.model.prefill_overhead_s + sum(
            self.cost.prefill_s(r.cached + r.done, n) for r, n in e.batch
        )
        if self.balance:
            self.balance.attention(e, sum(self.cost.attention_s(r.cached + r.done, n) for r, n in e.batch))
        if self.scheduler.layerwise:
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
        if self.reports.pe_changed(e) and self.queue:
            self._kick()
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
        self.reports.group_changed(de.node)
        self._dirty[de.node.idx] = None
        m = self.metrics
        m.arrival.append(r.arrival)
        m.ttft.append(r.t_first - r.arrival)
        m.read.append(r.t_ready - r.t_read)
        m.wait.append(r.t_fetch - r.arrival)
        m.alloc.append(r.t_read - r.t_fetch)
        m.handoff.append(r.t_join - r.t_first)
        m.tpot.append((now - r.t_join) / (r.gen - 1) if r.gen > 1 else 0.0)
        m.persisted_bytes += ((r.tokens + r.gen) // self.bt * self.bt - r.cached) * self.kv
        more = r.call + 1 < self.calls and now < self.stop_calls_at
        if self._history is not None:
            self._persisted(r, more)
        if not more:
            m.agents_done += 1
            m.last_done = now
        elif self.tool_latency_s:
            self.loop.at(now + self.tool_latency_s, self._next_call, (r.agent, r.call + 1, r.tokens, r.gen))
        else:
            self._arrive(self._call(r.agent, r.call + 1, r.tokens, r.gen))
        self._kick()

    def _persisted(self, r: SimRequest, more: bool) -> None:
        """The call's history is stored (as far as the store has room): the working set moves, by the KV
        an agent that will call again keeps in storage (an unbounded store's content)."""
        blocks = (r.tokens + r.gen) // self.bt
        if self.store:
            now = self.loop.now
            self.store.commit(
                r.agent, blocks, r.cached // self.bt, now, r.t_ready if r.cached else now, not more
            )
        history = cast(list[int], self._history)
        self.metrics.working_set(self.loop.now, (blocks if more else 0) - history[r.agent])
        history[r.agent] = blocks if more else 0
