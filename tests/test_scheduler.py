"""The scheduling policy on hand-built engine states (PAPER.md, Scheduling)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from dualpath_sdk.config import Mode, ReadPlanChoice, SchedulerConfig
from dualpath_sdk.scheduler import (
    AttentionModel,
    EngineReport,
    Pipeline,
    PrefillWork,
    Request,
    Scheduler,
    Snapshot,
    Thresholds,
    Waiting,
    block_chunks,
    choose_de,
    choose_de_group,
    choose_pe,
    derive_thresholds,
    fit_attention_model,
    largest_chunk,
    pack_quota,
    shorter_queue,
    split_read,
)


def pe(eid: str, tok: int, read_q: int = 0, node: str = "n0") -> EngineReport:
    return EngineReport(eid, node, "pe", seq_e=0, tok_e=tok, read_q=read_q, free_tokens=0)


def de(eid: str, tok: int, seq: int, free: int, node: str = "d0") -> EngineReport:
    return EngineReport(eid, node, "de", seq_e=seq, tok_e=tok, read_q=0, free_tokens=free)


def req(rid: int, tokens: int, cached: int = 0, decode: int = 0) -> Request:
    return Request(rid, tokens, cached, decode)


TH = Thresholds(alpha=1000, beta=500)


def ids(placements: list) -> list:
    return [(p.request.request_id, p.engine_id) for p in placements]


# --- PE choice -------------------------------------------------------------------------------------------


def test_pe_argmin_tok_and_tie_takes_report_order() -> None:
    engines = [pe("a", 100), pe("b", 50), pe("c", 50)]
    assert ids(choose_pe([req(1, 10)], engines, TH)) == [(1, "b")]


def test_pe_tokens_added_spread_requests() -> None:
    engines = [pe("a", 0), pe("b", 30)]
    # a: 0 -> 40, then b (30) < a (40), then b: 70 vs a 40 -> a.
    assert ids(choose_pe([req(1, 40), req(2, 40), req(3, 40)], engines, TH)) == [(1, "a"), (2, "b"), (3, "a")]


def test_pe_alpha_category_beats_lower_tokens() -> None:
    engines = [pe("busy_disk", 0, read_q=5000, node="n0"), pe("idle_disk", 400, read_q=10, node="n1")]
    assert ids(choose_pe([req(1, 10)], engines, TH)) == [(1, "idle_disk")]


def test_pe_falls_back_to_high_read_queue_when_low_set_is_full() -> None:
    engines = [pe("low", 490, read_q=0), pe("high", 0, read_q=5000)]
    # low takes the first (490+20 > beta: leaves); the second must go to the high-read_q engine.
    assert ids(choose_pe([req(1, 20), req(2, 20)], engines, TH)) == [(1, "low"), (2, "high")]


def test_pe_overload_nothing_qualifies_and_fifo_stops() -> None:
    engines = [pe("a", 501), pe("b", 900)]
    assert choose_pe([req(1, 1)], engines, TH) == []
    # a qualifies once, goes over beta, then the queue stops: request 3 is never looked at.
    engines = [pe("a", 450)]
    assert ids(choose_pe(iter([req(1, 100), req(2, 1), req(3, 1)]), engines, TH)) == [(1, "a")]


def test_thresholds_from_rates() -> None:
    th = derive_thresholds(SchedulerConfig(), snic_tokens_per_s=1e6, prefill_tokens_per_s=2e4)
    assert th == Thresholds(alpha=3e6, beta=1e5)


# --- DE choice -------------------------------------------------------------------------------------------


def test_de_group_smallest_sum_and_burst_spreads() -> None:
    out = choose_de_group([req(1, 100), req(2, 100), req(3, 100)], {"g0": 150, "g1": 100, "g2": 120})
    # g1 (100) -> 200; g2 (120) -> 220; g0 (150) -> 250.
    assert [(r.request_id, g) for r, g in out] == [(1, "g1"), (2, "g2"), (3, "g0")]


def test_de_group_tie_takes_first() -> None:
    out = choose_de_group([req(1, 5)], {"x": 7, "y": 7})
    assert out[0][1] == "x"


def test_de_slack_path_prefers_fewest_requests_within_z() -> None:
    engines = [de("a", tok=100, seq=5, free=10_000), de("b", tok=300, seq=1, free=10_000)]
    # R = both requests (60); Z = 1.05 * (60 + 400) / 2 = 241.5; only a stays within Z for a 50-token req.
    # b has fewer requests but would exceed Z, so a wins; then a: 150, seq 6; 10 tokens: a within Z.
    assert ids(choose_de([req(1, 50), req(2, 10)], engines, 1.05)) == [(1, "a"), (2, "a")]
    # Z = 1.05 * (4 + 204) / 2 = 109.2: both stay within, so min seq_e wins despite more tokens.
    engines = [de("a", tok=100, seq=5, free=10_000), de("b", tok=104, seq=1, free=10_000)]
    assert ids(choose_de([req(1, 4)], engines, 1.05)) == [(1, "b")]
    # Without the 5% slack Z = 104 and b (108) would be over it: the slack is what lets b in.
    assert ids(choose_de([req(1, 4)], engines, 1.0)) == [(1, "a")]


def test_de_fallback_min_tok_when_none_within_z() -> None:
    engines = [de("a", tok=100, seq=0, free=10_000), de("b", tok=90, seq=9, free=10_000)]
    # Z = 1.05 * (1000 + 190) / 2 = 624.75 < 90 + 1000: nobody within Z -> least tokens (b).
    assert ids(choose_de([req(1, 1000)], engines, 1.05)) == [(1, "b")]


def test_de_memory_limits_and_stops() -> None:
    engines = [de("a", tok=0, seq=0, free=100), de("b", tok=0, seq=0, free=60)]
    # 80 fits only a; 50 fits b; 70 fits nobody -> stop, and request 4 (small) is not placed either.
    out = choose_de([req(1, 70, decode=10), req(2, 50), req(3, 70), req(4, 1)], engines, 1.05)
    assert ids(out) == [(1, "a"), (2, "b")]


def test_de_z_counts_only_requests_that_fit() -> None:
    engines = [de("a", tok=0, seq=2, free=100), de("b", tok=40, seq=0, free=100)]
    # R = first request only (the 150 would exceed the 200 free). Z = 1.05 * (100 + 40) / 2 = 73.5:
    # a (100) and b (140) exceed Z -> fallback min tok -> a. Had the 150 counted, Z = 152 would admit
    # both and min seq_e would pick b. Then the 150 fits no engine: stop.
    assert ids(choose_de([req(1, 100), req(2, 150)], engines, 1.05)) == [(1, "a")]
    engines = [de("a", tok=0, seq=3, free=1000), de("b", tok=40, seq=0, free=1000)]
    # R = both: Z = 1.05 * (100 + 40 + 40) / 2 = 94.5 -> b (40 + 40 <= 94.5, seq 0) then a.
    assert ids(choose_de([req(1, 40), req(2, 100)], engines, 1.05))[0] == (1, "b")


# --- Read plan -------------------------------------------------------------------------------------------


def test_read_side_shorter_queue_and_ties() -> None:
    assert shorter_queue(10, 500, 100).kind == "de"
    assert shorter_queue(10, 100, 500).kind == "pe"
    assert shorter_queue(10, 7, 7).kind == "pe"
    assert shorter_queue(0, 7, 7).kind == "none"


@pytest.mark.parametrize(
    ("pe_q", "de_q", "pe_rate", "de_rate", "pe_blocks"),
    [
        (0, 0, 1.0, 1.0, 50),  # equal sides: half each
        (0, 0, 3.0, 1.0, 75),  # the faster side reads in proportion to its rate
        (3200, 0, 1.0, 1.0, 25),  # PE queue is 50 blocks behind: T = (3200+6400)/2 = 4800 -> 1600 tokens
    ],
)
def test_split_proportions(pe_q: float, de_q: float, pe_rate: float, de_rate: float, pe_blocks: int) -> None:
    plan = split_read(100, 64, pe_q, de_q, pe_rate, de_rate)
    assert plan.kind == "split"
    assert (plan.pe_blocks, plan.de_blocks) == (pe_blocks, 100 - pe_blocks)
    # Both sides then drain together (to within one block).
    t_pe = (pe_q + plan.pe_blocks * 64) / pe_rate
    t_de = (de_q + plan.de_blocks * 64) / de_rate
    assert abs(t_pe - t_de) <= 64 / min(pe_rate, de_rate)


def test_split_counts_a_partial_last_block_at_its_tokens() -> None:
    """Four blocks, the last holding 4 tokens: 196 tokens to read, not 256."""
    assert split_read(4, 64, 0, 0, 1.0, 1.0).pe_blocks == 2  # 256 tokens: 128 each
    plan = split_read(4, 64, 60, 0, 1.0, 1.0, cached_tokens=196)  # T = 128: the PE reads 68 tokens
    assert (plan.kind, plan.pe_blocks, plan.de_blocks) == ("split", 1, 3)


def test_split_degenerates_to_one_side() -> None:
    assert split_read(10, 64, 10_000, 0, 1.0, 1.0).kind == "de"
    assert split_read(10, 64, 0, 10_000, 1.0, 1.0).kind == "pe"
    assert split_read(0, 64, 0, 0, 1.0, 1.0).kind == "none"


def test_modes_decide_differently() -> None:
    cfg = SchedulerConfig()
    attn = AttentionModel(1e-4, 0.0, 0.0)
    engines = [pe("a", 0), pe("b", 0), pe("c", 400)]
    basic = Scheduler(cfg, TH, attn, "basic")
    # Round robin ignores load: a, b, c, a.
    got = ids(basic.choose_pe([req(i, 10) for i in range(4)], engines))
    assert [e for _, e in got] == ["a", "b", "c", "a"]
    assert basic.plan_read(8, 64, 1e9, 0, 1, 1).kind == "pe"
    assert not basic.layerwise
    dual = Scheduler(cfg.model_copy(update={"split_reads": False}), TH, attn, "dualpath")
    assert dual.plan_read(8, 64, 1e9, 0, 1, 1).kind == "de"
    assert dual.layerwise and not dual.skips_io
    assert Scheduler(cfg, TH, attn, "dualpath").plan_read(8, 64, 0, 0, 1, 1).kind == "split"
    assert Scheduler(cfg, TH, attn, "oracle").skips_io


def test_basic_de_round_robin_skips_full_engines() -> None:
    basic = Scheduler(SchedulerConfig(), TH, AttentionModel(0, 0, 0), "basic")
    engines = [de("a", 0, 0, free=10), de("b", 0, 0, free=100)]
    assert [e for _, e in ids(basic.choose_de([req(1, 50), req(2, 50), req(3, 50)], engines))] == ["b", "b"]


# --- Intra-PE batching -----------------------------------------------------------------------------------


def test_fit_recovers_coefficients() -> None:
    truth = AttentionModel(2e-5, 3e-9, 1e-3)
    samples = [(c, n, truth.time(c, n)) for c in (0, 1000, 8000, 30000) for n in (64, 500, 2000)]
    fit = fit_attention_model(samples)
    assert fit.a == pytest.approx(truth.a, rel=1e-6)
    assert fit.b == pytest.approx(truth.b, rel=1e-6)
    assert fit.c == pytest.approx(truth.c, rel=1e-6, abs=1e-9)
    with pytest.raises(ValueError):
        fit_attention_model(samples[:2])


def test_largest_chunk_is_the_boundary() -> None:
    model = AttentionModel(1e-3, 1e-7, 0.0)
    n = largest_chunk(model, 10_000, 5000, 0.2)
    assert model.time(10_000, n) <= 0.2 < model.time(10_000, n + 1)
    assert largest_chunk(model, 0, 50, 10.0) == 50


def test_pack_fifo_to_quota_with_chunk() -> None:
    model = AttentionModel(1e-3, 0.0, 0.0)  # 1 ms per new token
    queue = [PrefillWork("r1", 0, 100), PrefillWork("r2", 0, 150), PrefillWork("r3", 0, 10)]
    chunks = pack_quota(queue, model, 0.3)
    assert [(c.request_id, c.tokens) for c in chunks] == [("r1", 100), ("r2", 150), ("r3", 10)]
    chunks = pack_quota(queue, model, 0.2)
    # r1 fits (100 ms); r2 crosses: the largest chunk in the remaining 100 ms is 100 tokens; r3 waits.
    assert [(c.request_id, c.tokens) for c in chunks] == [("r1", 100), ("r2", 100)]


def test_pack_always_progresses() -> None:
    model = AttentionModel(0.0, 0.0, 1.0)  # a 1 s fixed cost exceeds any small quota
    chunks = pack_quota([PrefillWork("big", 0, 5)], model, 0.3)
    assert [(c.request_id, c.tokens) for c in chunks] == [("big", 1)]


def test_block_chunks_chunk_on_block_boundaries_within_the_quota() -> None:
    model = AttentionModel(1e-3, 0.0, 0.0)  # 1 ms per new token
    r1, r2 = PrefillWork("r1", 48, 37), PrefillWork("r2", 0, 100)
    # r1 (37 ms) fits 50 ms; r2's 13 ms rounds down to no block: it waits for the next batch
    assert block_chunks([r1, r2], model, 0.05, 16, 100, 2048) == [85]
    assert block_chunks([r1, r2], model, 0.07, 16, 100, 2048) == [85, 32]  # 33 tokens -> 2 blocks
    # nothing fits: the first request still moves by one block, the rest wait
    assert block_chunks([r1, r2], model, 1e-9, 16, 100, 2048) == [64]
    assert block_chunks([PrefillWork("r", 80, 5)], model, 1e-9, 16, 100, 2048) == [85]  # its last chunk
    # the work region's blocks and the new-token budget bound the batch too
    assert block_chunks([r1, r2], model, 10.0, 16, 8, 2048) == [85]
    assert block_chunks([r1, r2], model, 10.0, 16, 100, 50) == [85]  # r2 would get 13 new tokens
    assert block_chunks([r2], model, 10.0, 16, 100, 50) == [48]
    # a cached prefix that ends inside a block: a chunk still ends on a boundary
    partial = PrefillWork("p", 20, 60)
    assert block_chunks([partial], model, 1e-9, 16, 100, 2048) == [32]  # the rest of block 1
    assert block_chunks([partial], model, 0.03, 16, 100, 2048) == [48]  # 50 rounds down


def test_a_batchs_first_request_takes_at_least_the_chunk_floor() -> None:
    model = AttentionModel(1e-3, 0.0, 0.0)  # 1 ms per new token
    long, short = PrefillWork("long", 0, 1000), PrefillWork("short", 16, 40)
    # the quota alone cuts one block; the floor takes 300 tokens, rounded down to a boundary
    assert block_chunks([long], model, 1e-9, 16, 100, 2048) == [16]
    assert block_chunks([long], model, 1e-9, 16, 100, 2048, min_tokens=300) == [288]
    assert block_chunks([long], model, 0.5, 16, 100, 2048, min_tokens=300) == [496]  # the quota is more
    assert block_chunks([long], model, 1e-9, 16, 100, 200, min_tokens=300) == [192]  # max_tokens still binds
    # the floor never lengthens a request past its prompt, nor lets a later request break the quota
    assert block_chunks([short, long], model, 1e-9, 16, 100, 2048, min_tokens=300) == [56]
    assert block_chunks([short, long], model, 0.05, 16, 100, 2048, min_tokens=300) == [56]


# --- The placement pipeline ------------------------------------------------------------------------------


def pipeline(mode: Mode = "dualpath", split: bool = False) -> Pipeline:
    config = SchedulerConfig(split_reads=split)
    return Pipeline(Scheduler(config, Thresholds(alpha=1000, beta=5000), AttentionModel(0, 0, 0), mode), 64)


def test_a_pass_places_in_the_papers_order_and_each_plan_sees_the_reads_before_it() -> None:
    # Two PEs on one node, two DE groups. PE choice: 1 -> pa, 2 -> pb (fewer tokens), 3 -> pa.
    # Level 1: 1 -> g1 (fewer tokens), 2 -> g0, 3 -> g1.
    table = Snapshot(
        pe=[pe("pa", 0, node="p"), pe("pb", 0, node="p")],
        de={"g0": [de("d0", 500, 1, 10_000, "g0")], "g1": [de("d1", 0, 0, 10_000, "g1")]},
        nodes={"g0": 500},
    )
    queue = [req(1, 700, cached=640), req(2, 700, cached=640), req(3, 700, cached=640)]
    done = pipeline().place(queue, table)
    assert [(w.request.request_id, w.pe, w.group) for w in done.fetched] == [
        (1, "pa", "g1"),
        (2, "pb", "g0"),
        (3, "pa", "g1"),
    ]
    # Groups are walked in the order requests joined them: g1 (1 and 3), then g0 (2). Reads go to the
    # shorter queue (ties: PE): 1 ties at 0 and queues 640 tokens on the PE node, so 3 reads on g1, and
    # 2 finds the PE node's 640 longer than g0's reported 500 (without the pass's charge: 0, the PE side).
    got = [(d.request.request_id, d.pe, d.de, d.plan.kind, d.pe_tokens, d.de_tokens) for d in done.admitted]
    assert got == [
        (1, "pa", "d1", "pe", 640, 0),
        (3, "pa", "d1", "de", 0, 640),
        (2, "pb", "d0", "de", 0, 640),
    ]
    assert table.nodes == {"g0": 500}  # the pass charged its own copy


def test_a_request_waits_in_its_group_until_a_de_has_memory() -> None:
    table = Snapshot(pe=[pe("p0", 0)], de={"g": [de("d", 0, seq=1, free=100, node="g")]})
    done = pipeline().place([req(1, 150, decode=10)], table)
    [w] = done.fetched
    assert (w.pe, w.group) == ("p0", "g") and done.admitted == []
    # A later pass: the PE is over beta, so nothing new is fetched; the DE freed memory: the queue moves.
    table = Snapshot(pe=[], de={"g": [de("d", 0, seq=0, free=160, node="g")]}, queues={"g": [w]})
    assert pipeline().place([req(2, 10)], table).fetched == []
    assert pipeline().place([], table).admitted == []  # the group did not change: not walked
    [d] = pipeline().place([], table, changed=["g"]).admitted
    assert (d.request.request_id, d.pe, d.de) == (1, "p0", "d")
    # A group's queued tokens are its load (level 1): the next request goes to the other group.
    two = Snapshot(
        pe=[pe("p0", 0)],
        de={"g": [de("d", 0, 1, 100, "g")], "h": [de("e", 100, 1, 100, "h")]},
        queues={"g": [w]},
    )
    assert [x.group for x in pipeline().place([req(2, 10)], two).fetched] == ["h"]
    assert pipeline().place([req(2, 10)], Snapshot(pe=[pe("p0", 0)], de={})).fetched == []  # no DE yet


def test_an_idle_group_takes_a_request_too_big_for_it_so_its_de_refuses_it() -> None:
    big = Waiting(req(1, 500), "p0", "p", "g")
    idle = Snapshot(pe=[], de={"g": [de("a", 0, 0, 100, "g"), de("b", 0, 0, 200, "g")]}, queues={"g": [big]})
    assert [d.de for d in pipeline().place([], idle, ["g"]).admitted] == ["a"]
    busy = Snapshot(pe=[], de={"g": [de("a", 0, 0, 100, "g"), de("b", 50, 1, 200, "g")]}, queues={"g": [big]})
    assert pipeline().place([], busy, ["g"]).admitted == []  # b will free memory: the request waits


@pytest.mark.parametrize("seed", range(30))
def test_a_group_walk_places_what_choose_de_places_from_the_whole_queue(seed: int) -> None:
    """The walk hands choose_de only R and the request after it, and skips a head no DE fits."""
    rng = random.Random(seed)
    engines = [
        de(f"d{i}", rng.randrange(3000), rng.randrange(1, 5), rng.randrange(3000), "g")
        for i in range(rng.randrange(1, 5))
    ]
    queue = [
        Waiting(req(j, rng.randrange(1, 1500), decode=rng.randrange(200)), "p0", "p", "g")
        for j in range(rng.randrange(1, 16))
    ]
    for mode in ("dualpath", "basic"):
        whole = pipeline(mode).scheduler.choose_de([w.request for w in queue], engines)
        walk = pipeline(mode)  # basic: a fresh round-robin cursor
        walked = walk.place([], Snapshot(pe=[], de={"g": engines}, queues={"g": queue}), ["g"]).admitted
        assert [(d.request.request_id, d.de) for d in walked] == [
            (x.request.request_id, x.engine_id) for x in whole
        ]


def test_forced_read_plans_and_modes() -> None:
    table = Snapshot(pe=[pe("p0", 0, node="p")], de={"g": [de("d", 0, 0, 10_000, "g")]}, nodes={"p": 10_000})

    def plan(mode: Mode, choice: ReadPlanChoice) -> tuple[str, int, int]:
        r = Request(1, 500, cached_tokens=196, read_plan=choice)  # 4 blocks, the last holding 4 tokens
        [d] = pipeline(mode, split=True).place([r], table).admitted
        return d.plan.kind, d.pe_tokens, d.de_tokens

    assert plan("dualpath", "auto") == ("de", 0, 196)  # the PE node's queue is far longer
    assert plan("dualpath", "pe") == ("pe", 196, 0)
    assert plan("dualpath", "split") == ("split", 128, 68)  # forced: halves, the DE side ends partial
    table = replace(table, nodes={})
    assert plan("dualpath", "de") == ("de", 0, 196)
    assert plan("dualpath", "auto") == ("split", 128, 68)  # idle queues: the water-filling split
    assert plan("basic", "auto") == plan("oracle", "auto") == ("pe", 196, 0)


def test_oracle_plans_charge_no_read_queue() -> None:
    """Oracle skips every read, so a second plan in the pass sees the queues as the first did."""
    table = Snapshot(pe=[pe("p0", 0, node="p")], de={"g": [de("d", 0, 0, 10_000, "g")]})
    queue = [req(1, 700, cached=640), req(2, 700, cached=640)]
    dual = pipeline("dualpath").place(queue, table).admitted
    oracle = pipeline("oracle").place(queue, table).admitted
    assert [d.plan.kind for d in dual] == ["pe", "de"]
    assert [d.plan.kind for d in oracle] == ["pe", "pe"]
