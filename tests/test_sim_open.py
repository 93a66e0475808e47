"""The simulator's second round: the ablation steps, load balance, tool latency, bounded storage."""

from __future__ import annotations

import itertools
from dataclasses import astuple

import numpy as np
import pytest

from dualpath_sdk.config import Mode, SchedulerConfig
from dualpath_sdk.sim.ablation import STEPS, Features
from dualpath_sdk.sim.cluster import Options, Simulation
from dualpath_sdk.sim.metrics import summary
from dualpath_sdk.sim.store import SessionStore
from dualpath_sdk.sim.workload import SHAPES, Trajectories, generate
from tests.test_sim import COMPUTE, one_agent, tiny_preset


def run(
    traj: Trajectories,
    mode: Mode = "dualpath",
    options: Options | None = None,
    split: bool = True,
    pe_queue: int = 0,
    nodes: tuple[int, int] = (1, 1),
) -> Simulation:
    sim = Simulation(
        tiny_preset(*nodes),
        mode,
        traj,
        np.zeros(traj.agents),
        SchedulerConfig(split_reads=split),
        options=options or Options(),
    )
    sim.nodes[0].read_q = pe_queue
    sim.run()
    return sim


def twelve_agents() -> Trajectories:
    traj = generate(SHAPES["32K"], 12, 0)
    return Trajectories(traj.first_prompt // 8, traj.append[:, :6], traj.gen[:, :6])


def outcome(sim: Simulation) -> tuple[list[float], list[float], dict[str, int], float]:
    m = sim.metrics
    return list(m.ttft), list(m.tpot), dict(m.plans), m.last_done


# --- ablation --------------------------------------------------------------------------------------------


def test_each_ablation_step_turns_on_one_more_part() -> None:
    steps = list(STEPS.values())
    assert steps[0] == Features(False, False, False) and steps[-1] == Features(True, True, True)
    for before, after in itertools.pairwise(steps):
        changed = [a != b for a, b in zip(astuple(before), astuple(after), strict=True)]
        assert sum(changed) == 1 and all(b >= a for a, b in zip(astuple(before), astuple(after), strict=True))


@pytest.mark.parametrize("split", [False, True])
def test_ablation_ends_are_basic_and_dualpath(split: bool) -> None:
    """The first step decides and times exactly as Basic, the last exactly as DualPath."""
    traj = twelve_agents()
    first = run(traj, options=Options(features=STEPS["basic"]), split=split, nodes=(2, 2))
    last = run(traj, options=Options(features=STEPS["+scheduler"]), split=split, nodes=(2, 2))
    assert outcome(first) == outcome(run(traj, "basic", split=split, nodes=(2, 2)))
    assert outcome(last) == outcome(run(traj, "dualpath", split=split, nodes=(2, 2)))


@pytest.mark.parametrize(
    ("step", "pe_queue", "plan", "expected"),
    [
        # test_sim's timelines: read 0.64 s, loads 0.064 s, sends 0.0706 s, compute COMPUTE.
        ("basic", 0, "pe", 0.64 + 0.064 + COMPUTE + 0.0706),
        # Layer-wise: loads, compute and sends overlap (plus a layer of fill); reads stay on the PE side
        # even when its queue is long, since the dual path is not on yet.
        ("+layerwise", 10**9, "pe", 0.64 + 0.0706 + COMPUTE / 10),
        # The dual path: the long PE queue sends the read to the DE side; only new KV goes back.
        ("+dual path", 10**9, "de", 0.64 + 0.064 + COMPUTE / 10),
    ],
)
def test_ablation_step_timeline(step: str, pe_queue: int, plan: str, expected: float) -> None:
    sim = run(one_agent(), options=Options(features=STEPS[step]), split=False, pe_queue=pe_queue)
    assert sim.metrics.ttft[1] == pytest.approx(expected, rel=1e-6)
    assert sim.metrics.plans[plan] == 1


# --- load balance ----------------------------------------------------------------------------------------


def test_sampling_changes_no_result_and_sees_basic_reading_on_one_node() -> None:
    """Observing must not move a clock; in Basic only the PE node's SNIC reads: max/avg = 2 of 2 nodes."""
    traj = twelve_agents()
    for mode in ("basic", "dualpath"):
        plain = run(traj, mode)
        sampled = run(traj, mode, Options(sample_s=0.5))
        assert outcome(sampled) == outcome(plain)
        assert sampled.balance is not None and sampled.balance.snic_ratio
        if mode == "basic":
            assert sampled.balance.snic_ratio == pytest.approx([2.0] * len(sampled.balance.snic_ratio))
        else:
            assert all(1.0 <= x <= 2.0 for x in sampled.balance.snic_ratio)
            assert min(sampled.balance.snic_ratio) < 2.0  # the DE side reads too


# --- tool latency ----------------------------------------------------------------------------------------


def test_tool_latency_delays_exactly_the_next_call() -> None:
    """A lone agent's call k+1 arrives L after call k ends; nothing else about any call changes."""
    traj = Trajectories(np.array([640]), np.array([[0, 64, 30]]), np.array([[2, 2, 5]]))
    base, late = run(traj), run(traj, options=Options(tool_latency_s=5.0))
    assert list(late.metrics.ttft) == pytest.approx(list(base.metrics.ttft), rel=1e-9)
    assert list(late.metrics.tpot) == pytest.approx(list(base.metrics.tpot), rel=1e-9)
    arrivals = np.frombuffer(late.metrics.arrival) - np.frombuffer(base.metrics.arrival)
    assert arrivals == pytest.approx([0.0, 5.0, 10.0])
    assert late.metrics.last_done == pytest.approx(base.metrics.last_done + 10.0)


def test_working_set_counts_history_of_agents_that_call_again() -> None:
    """After call 0 the agent keeps (640 + 2) // 64 = 10 blocks until its last call ends."""
    sim = run(one_agent(), options=Options(working_set=True, tool_latency_s=1.0))
    m = sim.metrics
    first_end = m.arrival[1] - 1.0
    out = summary(sim, 1.0, m.last_done, np.ones(2, dtype=bool))
    assert m.ws_peak == 10 and m.ws_blocks == 0
    block_gb = 64 * 1000 / 1e9
    assert out["ws_peak_gb"] == round(10 * block_gb, 1)
    assert m.ws_area == pytest.approx(10 * (m.last_done - first_end))


# --- bounded storage: LRU eviction and session pins ------------------------------------------------------


def test_eviction_takes_unpinned_chains_first() -> None:
    """Agent 0 is the least recently used but pinned; agent 1 closed its session: it goes first."""
    store = SessionStore(agents=4, capacity=10, pin_ttl_s=100.0)
    store.commit(0, 4, 0, now=0.0, last_use=0.0, closes=False)  # pinned until 100
    store.commit(1, 4, 0, now=1.0, last_use=1.0, closes=True)  # unpinned
    store.commit(2, 4, 0, now=2.0, last_use=2.0, closes=False)  # needs 2 more blocks: evicts agent 1 whole
    assert store.held == [4, 0, 4, 0] and store.evicted == 4 and store.used == 8
    # At 150 s every pin has run out: LRU order, oldest first (agent 0, then no more is needed).
    store.commit(3, 6, 0, now=150.0, last_use=150.0, closes=False)
    assert store.held == [0, 0, 4, 6] and store.evicted == 8 and store.failed == 0


def test_writes_fail_when_every_block_is_pinned() -> None:
    store = SessionStore(agents=2, capacity=10, pin_ttl_s=100.0)
    store.commit(0, 8, 0, now=0.0, last_use=0.0, closes=False)
    store.commit(1, 5, 0, now=1.0, last_use=1.0, closes=False)  # room for 2 of its 5 blocks
    assert store.held == [8, 2] and store.failed == 3 and store.evicted == 0
    assert store.lookup(1, 5) == 2  # its next call finds the leading 2 blocks


def test_without_pins_lru_evicts_the_least_recently_used_and_spares_a_chain_being_read() -> None:
    store = SessionStore(agents=4, capacity=10, pin_ttl_s=0.0)
    store.commit(0, 4, 0, now=0.0, last_use=0.0, closes=False)
    store.commit(1, 4, 0, now=1.0, last_use=1.0, closes=False)
    assert store.lookup(0, 4) == 4  # agent 0's next call is reading its chain: not a victim
    store.commit(2, 4, 0, now=2.0, last_use=2.0, closes=False)
    assert store.held == [4, 0, 4, 0]
    store.read_done(0, now=3.0)  # read at 3 s: now more recently used than agent 2
    store.commit(3, 4, 0, now=4.0, last_use=4.0, closes=False)  # 2 blocks short: agent 2's chain goes
    assert store.held == [4, 0, 0, 4]
    # Agent 0's call had found its 4 blocks; its chain went while it ran: the new blocks are not written.
    store.commit(2, 6, 0, now=5.0, last_use=5.0, closes=False)  # 2 blocks short: agent 0's chain goes
    store.commit(0, 6, 4, now=6.0, last_use=3.0, closes=False)
    assert store.held == [0, 0, 6, 4] and store.failed == 0


def test_bounded_storage_in_a_run() -> None:
    """A store with room for everything changes nothing; one with none makes call 1 recompute it all."""
    plenty = run(one_agent(), options=Options(storage_blocks=1000))
    assert outcome(plenty) == outcome(run(one_agent()))
    assert plenty.metrics.hit_tokens == plenty.metrics.history_tokens == 640
    empty = run(one_agent(), options=Options(storage_blocks=0))
    m = empty.metrics
    assert m.hit_tokens == 0 and m.history_tokens == 640 and m.plans["none"] == 2
    out = summary(empty, 1.0, m.last_done, np.ones(2, dtype=bool))
    # Prefilled: 640 (call 0) + 706 (call 1, nothing found); 640 of them were history.
    assert out["hit_rate"] == 0.0 and out["recompute_share"] == round(640 / (640 + 706), 4)
    assert out["write_failed_gb"] == round((10 + 11) * 64 * 1000 / 1e9, 1)
