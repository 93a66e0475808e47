"""Hand-checkable simulator scenarios: links, priorities, one request per read path, conservation."""

from __future__ import annotations

import gc
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import replace

import numpy as np
import pytest

from dualpath_sdk.config import Mode, SchedulerConfig
from dualpath_sdk.scheduler import (
    EngineReport,
    Pass,
    Pipeline,
    Reports,
    Request,
    Thresholds,
    choose_de_group,
    choose_pe,
)
from dualpath_sdk.sim.candidates import SimReports
from dualpath_sdk.sim.cluster import Simulation
from dualpath_sdk.sim.core import KV, MODEL, EventLoop, Job, Link
from dualpath_sdk.sim.presets import PRESETS, Hardware, Model, Preset
from dualpath_sdk.sim.ranking import Ranking
from dualpath_sdk.sim.runner import offline, online
from dualpath_sdk.sim.workload import SHAPES, Trajectories, generate


def finish_times(loop: EventLoop, link: Link, flows: list[tuple[float, int]]) -> list[float]:
    done: list[float] = [0.0] * len(flows)

    def record(i: int) -> None:
        done[i] = loop.now

    for i, (nbytes, cls) in enumerate(flows):
        job = Job(record, i)
        link.add(nbytes, cls, job)
        job.start()
    loop.run()
    return done


def test_two_flows_share_one_link_fairly() -> None:
    loop = EventLoop()
    link = Link(loop, "l", capacity=100.0)
    # 50 B/s each until the small flow ends at 2 s; then the big one gets 100 B/s for its last 200 B.
    assert finish_times(loop, link, [(100, KV), (300, KV)]) == pytest.approx([2.0, 4.0])
    assert sum(link.served) == pytest.approx(400.0)
    assert sum(link.carried) == pytest.approx(400.0)


def test_model_class_goes_first_and_kv_takes_the_rest() -> None:
    loop = EventLoop()
    link = Link(loop, "l", capacity=100.0, model_share=0.99)
    model_end = 50 / 99
    kv_end = model_end + (100 - 1.0 * model_end) / 100
    assert finish_times(loop, link, [(100, KV), (50, MODEL)]) == pytest.approx([kv_end, model_end])
    # Alone, kv is work-conserving: the whole link.
    loop2 = EventLoop()
    assert finish_times(loop2, Link(loop2, "l", 100.0), [(100, KV)]) == pytest.approx([1.0])


def test_flow_added_midway_slows_the_first() -> None:
    loop = EventLoop()
    link = Link(loop, "l", capacity=10.0)
    ends: dict[str, float] = {}
    a = Job(lambda _: ends.setdefault("a", loop.now), None)
    link.add(20, KV, a)
    a.start()

    def add_b(_: object) -> None:
        b = Job(lambda _: ends.setdefault("b", loop.now), None)
        link.add(5, KV, b)
        b.start()

    loop.at(1.0, add_b)
    loop.run()
    # a alone for 1 s (10 B), then 5 B/s each: b done at 2 s, a has 5 B left at 10 B/s -> 2.5 s.
    assert ends == pytest.approx({"a": 2.5, "b": 2.0})


# --- one request through each read path -----------------------------------------------------------------

TINY_HW = Hardware(
    gpus_per_node=1, cnic_bps=1e7, snic_bps=1e6, dram_bps=1e12, gpu_flops=1e12, hbm_bps=1e12, hbm_bytes=80e9
)
TINY = Model(
    name="tiny",
    layers=10,
    kv_bytes_per_token=1000,
    active_params=1e8,
    weight_bytes=1e9,
    attn_flops_per_pair=0.0,
    weight_gpus=1,
    decode_overhead_s=0.01,
    prefill_overhead_s=0.0,
)


def tiny_preset(pe_nodes: int = 1, de_nodes: int = 1) -> Preset:
    return Preset("tiny", TINY, pe_nodes, de_nodes, hardware=TINY_HW)


def one_agent() -> Trajectories:
    # call 0: 640 tokens, nothing cached; call 1: 640 + 2 generated + 64 appended = 706, 640 cached.
    return Trajectories(np.array([640]), np.array([[0, 64]]), np.array([[2, 2]]))


def ttft_of_second_call(mode: Mode, split: bool = True, pe_queue: int = 0) -> tuple[float, dict[str, int]]:
    sim = Simulation(tiny_preset(), mode, one_agent(), np.zeros(1), SchedulerConfig(split_reads=split))
    sim.nodes[0].read_q = pe_queue
    m = sim.run()
    return m.ttft[1], m.plans


# Hand arithmetic: reading 640 tokens x 1000 B through a 1 MB/s SNIC takes 0.64 s; moving 640 KB over a
# 10 MB/s CNIC 0.064 s; 66 new tokens x 2 x 1e8 FLOPs at 1 TFLOP/s 0.0132 s; a layer of fill 0.00132 s.
COMPUTE = 66 * 2 * 1e8 / 1e12


@pytest.mark.parametrize(
    ("mode", "split", "pe_queue", "plan", "expected"),
    [
        # PE path: read 0.64; loads 0.064 || sends (66 + 640) KB 0.0706 || compute; plus fill.
        ("dualpath", False, 0, "pe", 0.64 + 0.0706 + COMPUTE / 10),
        # DE path: read on the DE SNIC; loads 640 KB DE->PE 0.064; only 66 new KB go back.
        ("dualpath", False, 10**9, "de", 0.64 + 0.064 + COMPUTE / 10),
        # Split 5/5 blocks: both SNICs read 320 KB in parallel (0.32); PE GPU still loads all 640 KB.
        ("dualpath", True, 0, "split", 0.32 + 0.064 + COMPUTE / 10),
        # Basic: read, then load, compute, send one after another.
        ("basic", True, 0, "pe", 0.64 + 0.064 + COMPUTE + 0.0706),
        # Oracle: compute only.
        ("oracle", True, 0, "none", COMPUTE + COMPUTE / 10),
    ],
)
def test_one_request_timeline(mode: Mode, split: bool, pe_queue: int, plan: str, expected: float) -> None:
    ttft, plans = ttft_of_second_call(mode, split, pe_queue)
    assert ttft == pytest.approx(expected, rel=1e-6)
    assert plans[plan] >= 1


def test_decode_step_time_from_bytes() -> None:
    sim = Simulation(tiny_preset(), "oracle", one_agent(), np.zeros(1))
    m = sim.run()
    # One decode step (gen = 2: the first token comes from prefill): overhead + weights + linear + KV read.
    step = 0.01 + 1e9 / 1e12 + 2 * 1e8 / 1e12 + 640 * 1000 / 1e12
    assert m.tpot[0] == pytest.approx(step, rel=1e-6)


# --- whole runs ------------------------------------------------------------------------------------------


def small_run(mode: Mode, seed: int) -> Simulation:
    traj = generate(SHAPES["32K"], 12, seed)
    traj = Trajectories(traj.first_prompt // 8, traj.append[:, :6], traj.gen[:, :6])
    sim = Simulation(tiny_preset(2, 2), mode, traj, np.zeros(12))
    sim.run()
    return sim


def test_bytes_are_conserved() -> None:
    sim = small_run("dualpath", 0)
    links = [n.snic for n in sim.nodes] + [n.dram for n in sim.nodes]
    links += [e.cnic_in for e in sim.pes + sim.des] + [e.cnic_out for e in sim.pes + sim.des]
    for link in links:
        assert link.served == pytest.approx(link.carried, rel=1e-6, abs=1.0)
        assert link.active(KV) == link.active(MODEL) == 0
    m, kv = sim.metrics, sim.kv
    read = (m.read_tokens_pe + m.read_tokens_de) * kv
    assert sum(sum(n.snic.carried) for n in sim.nodes) == pytest.approx(read)
    # What the PEs send is new KV plus the blocks they read; the DEs receive that plus the one handoff.
    calls = [(int(p), 0) for p in sim.first_prompt]
    tokens = cached = 0
    for a, (t, c) in enumerate(calls):
        for k in range(sim.calls):
            tokens += t
            cached += c
            history = t + sim.gen[a][k]
            if k + 1 < sim.calls:
                t, c = history + sim.append[a][k + 1], history // 64 * 64
    pe_out = sum(e.cnic_out.carried[KV] for e in sim.pes)
    de_in = sum(e.cnic_in.carried[KV] for e in sim.des)
    assert pe_out == pytest.approx((tokens - cached + m.read_tokens_pe) * kv)
    assert de_in == pytest.approx(pe_out + tokens * kv)
    assert m.plans["split"] + m.plans["pe"] + m.plans["de"] > 0


def test_determinism_with_a_seed() -> None:
    a, b, c = small_run("dualpath", 1), small_run("dualpath", 1), small_run("dualpath", 2)
    assert list(a.metrics.ttft) == list(b.metrics.ttft)
    assert a.loop.events == b.loop.events
    assert list(a.metrics.ttft) != list(c.metrics.ttft)


def test_storage_bound_ordering_on_paper_preset() -> None:
    """DS 660B 2P4D: PE-only reads saturate the PE SNICs, so basic is slower and oracle fastest."""
    res = {m: offline(PRESETS["ds660b-2p4d"], m, 256) for m in ("basic", "dualpath", "oracle")}
    assert res["basic"]["jct_s"] > 1.15 * res["dualpath"]["jct_s"]
    assert res["oracle"]["jct_s"] <= res["dualpath"]["jct_s"] * 1.02
    assert res["basic"]["read_share_de"] == 0.0 < res["dualpath"]["read_share_de"]


def test_online_slo_check() -> None:
    ok = online(PRESETS["ds27b-1p1d"], "dualpath", rate=0.1, horizon_s=120)
    assert ok["requests"] > 0 and ok["within_slo"]
    # The tiny 1 MB/s SNIC needs ~30 s to read one 64K-workload context: far over the 4 s TTFT.
    slow = online(tiny_preset(), "dualpath", rate=0.05, horizon_s=200)
    assert slow["ttft_s"] > 4.0 and not slow["within_slo"]


# --- fast paths: same decisions as the scheduler given every report ----------------------------------------


def test_flows_started_together_on_one_link_cost_one_event() -> None:
    loop = EventLoop()
    link = Link(loop, "l", capacity=100.0)
    # Ten equal flows added by one callback: one recomputation, one finish event when all end together.
    assert finish_times(loop, link, [(10, KV)] * 10) == pytest.approx([1.0] * 10)
    assert loop.events == 1


@pytest.mark.parametrize("seed", range(20))
def test_ranking_candidates_give_the_full_choice(seed: int) -> None:
    """choose_pe / choose_de_group on the k smallest per class equal the choice over every report."""
    rng = np.random.default_rng(seed)
    n, k = 40, int(rng.integers(1, 12))
    th = Thresholds(alpha=1000.0, beta=5000.0)
    tok = rng.integers(0, 5000, size=n).tolist()
    read_q = rng.integers(0, 2000, size=n).tolist()
    order = rng.permutation(n).tolist()  # report order, as under_beta insertion order
    rank = Ranking(n, 2)
    for i in range(n):
        rank.put(0 if read_q[i] <= th.alpha else 1, i, tok[i] + 1, order[i])
        rank.put(0 if read_q[i] <= th.alpha else 1, i, tok[i], order[i])  # the stale entry must be skipped
    queue = [Request(j, int(rng.integers(1, 3000))) for j in range(k)]

    def reports(ids: list[int]) -> list[EngineReport]:
        ids = sorted(ids, key=lambda i: order[i])
        return [EngineReport(i, i, "pe", 0, tok[i], read_q[i], 0) for i in ids]

    cands = [c[2] for cls in (0, 1) for c in rank.smallest(cls, k)]
    assert len(cands) <= 2 * k < n
    full = [p.engine_id for p in choose_pe(queue, reports(list(range(n))), th)]
    assert [p.engine_id for p in choose_pe(queue, reports(cands), th)] == full
    # Level-1 DE choice: groups in one class, the k smallest of them.
    groups = {i: tok[i] for i in sorted(range(n), key=lambda i: order[i])}
    one = Ranking(n, 1)
    for i in range(n):
        one.put(0, i, tok[i], order[i])
    few = {c[2]: tok[c[2]] for c in sorted(one.smallest(0, k), key=lambda c: c[1])}
    assert [g for _, g in choose_de_group(queue, few)] == [g for _, g in choose_de_group(queue, groups)]


class CheckedPipeline(Pipeline):
    """The simulator's pipeline, each pass also run on the full reports: both must decide alike.

    A Pipeline itself, and the full reports are built rather than copied: the simulator's attributes
    are typed, and checked at runtime when its modules are compiled (sim/build.py).
    """

    def __init__(self, pipeline: Pipeline, reports: SimReports) -> None:
        super().__init__(pipeline.scheduler, pipeline.block_tokens, pipeline.read_tps)
        self.pipeline = pipeline
        # the same engines and queues, shown unnarrowed
        self.full = SimReports(
            reports.nodes, reports.all_pes, reports.queue, reports.alpha, reports.beta, False
        )
        self.full.under_beta = reports.under_beta
        self.narrowed_pes = self.narrowed_groups = 0  # passes that were shown less than everything
        self.waited = 0  # the longest group queue a pass met: requests that waited for DE memory
        self.idle = 0  # idle (group, state) pairs checked

    def place(self, queue: Sequence[Request], reports: Reports, changed: Iterable[Hashable] = ()) -> Pass:
        assert isinstance(reports, SimReports)
        changed = list(changed)
        self.waited = max(self.waited, *(len(n.de_queue) for n in reports.de_nodes))
        fast = self.pipeline.place(queue, reports, changed)
        assert fast == self.pipeline.place(queue, self.full, changed)
        # The passes the simulator skips as idle are ones that would place nothing.
        for node in reports.de_nodes:
            if reports.idle([node.idx]):
                assert self.pipeline.place(queue, reports, [node.idx]) == Pass([], [])
                self.idle += 1
        if queue and fast.fetched:
            self.narrowed_pes += len(reports.pes()) < len(self.full.pes())
            k = len(fast.fetched)
            self.narrowed_groups += len(reports.group_loads(k)) < len(self.full.group_loads(k))
        return fast


@pytest.mark.parametrize(("mode", "hbm"), [("dualpath", 80e9), ("oracle", 80e9), ("dualpath", 32e9)])
def test_simulator_fast_paths_agree_with_full_reports(mode: Mode, hbm: float) -> None:
    """A 2P4D run whose every pass is checked against the pipeline shown every report.

    With 32 GB of HBM the DE groups run out of KV memory and requests wait in their queues (level 2).
    """
    traj = generate(SHAPES["32K"], 96, 3)
    traj = Trajectories(traj.first_prompt, traj.append[:, :8], traj.gen[:, :8])
    preset = PRESETS["ds660b-2p4d"]
    preset = replace(preset, hardware=replace(preset.hardware, hbm_bytes=hbm))
    sim = Simulation(preset, mode, traj, np.zeros(96))
    checked = CheckedPipeline(sim.pipeline, sim.reports)
    sim.pipeline = checked
    m = sim.run()
    assert m.agents_done == 96
    # The fast paths did hand over less than everything (else this checks nothing).
    assert checked.narrowed_pes > 0 and checked.narrowed_groups > 0
    assert (checked.waited > 0) == (hbm < 80e9)
    if hbm < 80e9:  # passes that run for one group's queue meet groups whose walk would be idle
        assert checked.idle > 0


def test_a_run_leaves_no_garbage_cycles() -> None:
    """Every call is freed when it ends (no reference cycle left for the collector), and the run hands
    back what it froze for the collector."""
    traj = generate(SHAPES["32K"], 32, 1)
    sim = Simulation(PRESETS["ds660b-2p4d"], "dualpath", traj, np.zeros(32))
    gc.collect()
    gc.disable()
    try:
        m = sim.run()
        assert gc.collect() == 0
    finally:
        gc.enable()
    assert m.agents_done == 32 and gc.get_freeze_count() == 0


def test_a_call_bigger_than_a_decode_engine_is_an_error() -> None:
    """An idle DE is handed a call too big for its memory, so a cluster's DE refuses it; the simulator
    has no refusal to model, so the run stops there instead of stalling the group's queue."""
    hw = replace(TINY_HW, hbm_bytes=1e9 + 10e9 + 700 * 1000)  # 700 tokens of KV memory per DE
    sim = Simulation(Preset("tiny", TINY, 1, 1, hardware=hw), "dualpath", one_agent(), np.zeros(1))
    with pytest.raises(ValueError, match="708 tokens exceeds"):  # call 1: 706 prompt + 2 generated
        sim.run()


def test_split_reads_shorten_the_kv_read_at_low_load() -> None:
    """Online at a light load both SNICs are idle: a split read takes about half a one-side read."""
    preset = PRESETS["ds27b-1p1d"]
    split = online(preset, "dualpath", rate=0.05, horizon_s=120, config=SchedulerConfig(split_reads=True))
    side = online(preset, "dualpath", rate=0.05, horizon_s=120, config=SchedulerConfig(split_reads=False))
    assert split["plans"]["split"] > 0 == side["plans"]["split"]
    assert split["read_s"] < 0.65 * side["read_s"]
    assert split["ttft_s"] < side["ttft_s"]
