"""The dual-path data plane end to end: real PE and DE processes, real store, real transport.

Over multi-turn sessions, greedy outputs through the cluster must equal transformers' (and the
single-process engine's) token for token, whichever side read the cached KV.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dualpath_sdk.api.cluster import Cluster
from dualpath_sdk.api.session import Session
from dualpath_sdk.config import ClusterConfig, EngineConfig, SchedulerConfig, StoreConfig, TransferConfig
from dualpath_sdk.errors import EngineUnavailable, InvalidInput, SessionBusy
from tests.conftest import Pair, hf_greedy

BLOCK = 16
TURN_TOKENS = 37  # not a multiple of the block size: partial tail blocks every turn
NEW_TOKENS = 12


def _turn(seed: int) -> list[int]:
    return torch.randint(0, 512, (TURN_TOKENS,), generator=torch.Generator().manual_seed(seed)).tolist()


def _cluster(pair: Pair, store: Path, backend: str) -> Cluster:
    return Cluster(
        ClusterConfig(
            model=str(pair.path),
            engine=EngineConfig(block_size=BLOCK, num_blocks=256),
            store=StoreConfig(root=store),
            transfer=TransferConfig(backend=backend),
            buffer_slots=64,
        )
    )


@pytest.fixture(scope="module")
def cluster(tiny_llama: Pair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with _cluster(tiny_llama, tmp_path_factory.mktemp("store"), "local") as running:
        yield running


@pytest.fixture(scope="module")
def mooncake_cluster(tiny_llama: Pair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if importlib.util.find_spec("mooncake") is None:
        pytest.skip("mooncake-transfer-engine-non-cuda is not installed (make test installs it)")
    with _cluster(tiny_llama, tmp_path_factory.mktemp("store"), "mooncake") as running:
        yield running


def _step(session: Session, seed: int, plan: str) -> list[int]:
    return session.step_tokens(_turn(seed), max_tokens=NEW_TOKENS, ignore_eos=True, read_plan=plan).token_ids


@pytest.mark.parametrize("transport", ["local", "mooncake"])
@pytest.mark.parametrize("plan", ["pe", "de", "split"])
def test_five_turns_are_exact_over_each_read_path(
    request: pytest.FixtureRequest, tiny_llama: Pair, plan: str, transport: str
) -> None:
    cluster = request.getfixturevalue("cluster" if transport == "local" else "mooncake_cluster")
    session = cluster.session()
    base = {"pe": 100, "de": 200, "split": 300}[plan]  # distinct tokens: no sharing between the tests
    for turn in range(5):
        before = session.token_ids
        new = _turn(base + turn)
        result = session.step_tokens(new, max_tokens=NEW_TOKENS, ignore_eos=True, read_plan=plan)
        prompt = before + new
        assert result.token_ids == hf_greedy(tiny_llama, prompt, NEW_TOKENS), f"turn {turn}"
        assert session.token_ids == prompt + result.token_ids
        if turn == 0:
            assert result.load.plan == "none"
            continue
        # the KV of every earlier token but the last sampled one was persisted (Full Blocks and the
        # trailing partial block) and is loaded, not recomputed
        cached = result.usage.cached_tokens
        assert cached == len(before) - 1
        assert result.load.plan == plan
        read_bytes = result.load.bytes_pe + result.load.bytes_de
        assert read_bytes > 0 and read_bytes % cached == 0  # so many bytes per token, partial or not
        if plan == "pe":
            assert result.load.bytes_de == 0
        elif plan == "de":
            assert result.load.bytes_pe == 0
        elif cached > BLOCK:
            assert result.load.bytes_pe > 0 and result.load.bytes_de > 0


def test_the_cluster_matches_the_single_process_engine(cluster: Cluster, tiny_llama: Pair) -> None:
    from dualpath_sdk.engine.core import EngineCore
    from dualpath_sdk.engine.sequence import SamplingParams

    session = cluster.session()
    _step(session, 10, "de")
    result = session.step_tokens(_turn(11), max_tokens=NEW_TOKENS, ignore_eos=True, read_plan="split")
    prompt = session.token_ids[:-NEW_TOKENS]
    engine = EngineCore(tiny_llama.ours, EngineConfig(block_size=BLOCK, num_blocks=64))
    alone = engine.generate([prompt], SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))[0]
    assert result.token_ids == alone.output_ids


def test_a_corrupted_block_costs_a_recompute_not_a_wrong_token(cluster: Cluster, tiny_llama: Pair) -> None:
    session = cluster.session()
    for turn in range(2):
        _step(session, 20 + turn, "de")
    store_root = Path(cluster.config.store.root) / "blocks"
    first_key = session._manifest.block_keys[1]  # the second block of the conversation
    (path,) = store_root.rglob(f"{first_key}*")
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    before = session.token_ids
    result = session.step_tokens(_turn(22), max_tokens=NEW_TOKENS, ignore_eos=True, read_plan="pe")
    assert result.usage.cached_tokens == BLOCK  # only the block before the corrupt one was reused
    assert result.token_ids == hf_greedy(tiny_llama, before + _turn(22), NEW_TOKENS)


def test_bad_input_changes_nothing(cluster: Cluster) -> None:
    session = cluster.session()
    _step(session, 30, "pe")
    before = session.token_ids
    with pytest.raises(InvalidInput):
        session.step_tokens([1, 2, 99999])
    with pytest.raises(InvalidInput):
        session.step_tokens([1, 2], read_plan="sideways")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        session.step_tokens([])
    assert session.token_ids == before
    assert cluster.resume(session.id).token_ids == before


def test_steps_of_one_session_do_not_overlap(cluster: Cluster) -> None:
    session = cluster.session()
    errors: list[Exception] = []

    def slow_step() -> None:
        session.step_tokens(_turn(40), max_tokens=200, ignore_eos=True)

    worker = threading.Thread(target=slow_step)
    worker.start()
    time.sleep(0.05)
    try:
        session.step_tokens(_turn(41), max_tokens=2)
    except SessionBusy as exc:
        errors.append(exc)
    worker.join()
    assert errors, "a second concurrent step must raise SessionBusy"


@pytest.mark.parametrize("victim", ["pe0", "de0"])
def test_a_killed_engine_retries_or_fails_cleanly_and_the_session_resumes(
    cluster: Cluster, tiny_llama: Pair, victim: str
) -> None:
    session = cluster.session()
    _step(session, 50, "de")
    before = session.token_ids
    killer = threading.Timer(0.15, cluster.kill_engine, args=(victim,))
    killer.start()
    try:
        result = session.step_tokens(_turn(51), max_tokens=400, ignore_eos=True, read_plan="de")
    except EngineUnavailable:
        assert session.token_ids == before  # a failed step leaves the session as it was
        assert cluster.resume(session.id).token_ids == before
    else:
        assert result.token_ids == hf_greedy(tiny_llama, before + _turn(51), 400)
    killer.join()
    resumed = cluster.resume(session.id)
    prompt = resumed.token_ids + _turn(52)
    again = resumed.step_tokens(_turn(52), max_tokens=NEW_TOKENS, ignore_eos=True, read_plan="pe")
    assert again.token_ids == hf_greedy(tiny_llama, prompt, NEW_TOKENS)


def test_a_session_resumes_from_persisted_kv_after_a_restart(tiny_llama: Pair, tmp_path: Path) -> None:
    with _cluster(tiny_llama, tmp_path, "local") as first:
        session = first.session()
        for turn in range(2):
            _step(session, 60 + turn, "pe")
        session_id, tokens = session.id, session.token_ids
    with _cluster(tiny_llama, tmp_path, "local") as second:
        resumed = second.resume(session_id)
        assert resumed.token_ids == tokens
        result = resumed.step_tokens(_turn(62), max_tokens=NEW_TOKENS, ignore_eos=True, read_plan="de")
        assert result.usage.cached_tokens == len(tokens) - 1
        assert result.token_ids == hf_greedy(tiny_llama, tokens + _turn(62), NEW_TOKENS)


def test_a_bad_cluster_configuration_is_invalid_input_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="prefill_nodes"):
        Cluster.local(prefill_nodes=0, storage=tmp_path)
    with pytest.raises(InvalidInput, match="no_such_knob"):
        Cluster.local(storage=tmp_path, no_such_knob=1)


def _agents_at_once(
    cluster: Cluster, pair: Pair, agents: int, turns: int, seed: int, plans: list[str] | None = None
) -> None:
    """`agents` sessions step at once, each turn on the next of `plans` (default: every forced plan in
    turn); all finish, all exact."""
    plans = plans or ["pe", "de", "split"]
    results: dict[int, list[tuple[list[int], list[int]]]] = {}
    errors: list[BaseException] = []

    def agent(i: int) -> None:
        try:
            session = cluster.session()
            steps = []
            for turn in range(turns):
                new = _turn(seed + 10 * i + turn)
                prompt = session.token_ids + new
                plan = plans[(i + turn) % len(plans)]
                out = session.step_tokens(new, max_tokens=6, ignore_eos=True, read_plan=plan)
                steps.append((prompt, out.token_ids))
            results[i] = steps
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(agents)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not errors, errors[0]
    assert len(results) == agents
    for steps in results.values():
        for prompt, output in steps:
            assert output == hf_greedy(pair, prompt, 6)


def test_sixteen_sessions_stepping_at_once_all_finish_exact(cluster: Cluster, tiny_llama: Pair) -> None:
    _agents_at_once(cluster, tiny_llama, agents=16, turns=3, seed=1000)


def test_requests_queue_for_buffer_slots_without_stalling_the_engines(
    tiny_llama: Pair, tmp_path: Path
) -> None:
    """Buffers of 6 slots: a second-turn prompt fills a DE buffer, so requests wait their turn for
    slots while the engines go on prefilling and decoding the ones that have them."""
    config = ClusterConfig(
        model=str(tiny_llama.path),
        engine=EngineConfig(block_size=BLOCK, num_blocks=128),
        store=StoreConfig(root=tmp_path),
        buffer_slots=6,
    )
    with Cluster(config) as running:
        _agents_at_once(running, tiny_llama, agents=6, turns=2, seed=2000)


@pytest.mark.parametrize("mode", ["basic", "oracle"])
def test_basic_mode_is_exact_and_oracle_skips_every_read(tiny_llama: Pair, tmp_path: Path, mode: str) -> None:
    config = ClusterConfig(
        model=str(tiny_llama.path),
        mode=mode,
        engine=EngineConfig(block_size=BLOCK, num_blocks=128),
        store=StoreConfig(root=tmp_path),
        buffer_slots=32,
    )
    with Cluster(config) as running:
        session = running.session()
        for turn in range(3):
            before = session.token_ids
            new = _turn(400 + turn)
            result = session.step_tokens(new, max_tokens=NEW_TOKENS, ignore_eos=True)
            assert result.usage.cached_tokens == max(len(before) - 1, 0)
            if mode == "basic":
                assert result.token_ids == hf_greedy(tiny_llama, before + new, NEW_TOKENS)
                assert result.load.bytes_de == 0
                assert (result.load.bytes_pe > 0) == (turn > 0)
            else:
                assert result.load.bytes_pe == result.load.bytes_de == 0
        if mode == "basic":
            with pytest.raises(InvalidInput, match="PE side only"):
                session.step_tokens(_turn(410), read_plan="de")
        else:
            assert running.store.stats().blocks == 0  # garbage KV never reaches the store


def _auto_turns(session: Session, pair: Pair, seed: int) -> list[str]:
    plans = []
    for turn in range(3):
        before, new = session.token_ids, _turn(seed + turn)
        result = session.step_tokens(new, max_tokens=NEW_TOKENS, ignore_eos=True)
        assert result.token_ids == hf_greedy(pair, before + new, NEW_TOKENS), f"turn {turn}"
        if result.load.plan == "split":
            assert result.load.bytes_pe > 0 and result.load.bytes_de > 0
        plans.append(result.load.plan)
    return plans


def test_an_idle_cluster_splits_reads_by_default(cluster: Cluster, tiny_llama: Pair) -> None:
    """Both read queues empty and equally fast: the scheduler halves each read between the sides."""
    assert cluster.config.scheduler.split_reads and cluster.config.read_plan == "auto"
    assert _auto_turns(cluster.session(), tiny_llama, 500) == ["none", "split", "split"]


def test_without_split_reads_the_paper_rule_picks_one_side(tiny_llama: Pair, tmp_path: Path) -> None:
    """The paper's rule on equal read queues: the PE side (ties go to the PE)."""
    config = ClusterConfig(
        model=str(tiny_llama.path),
        scheduler=SchedulerConfig(split_reads=False),
        engine=EngineConfig(block_size=BLOCK, num_blocks=128),
        store=StoreConfig(root=tmp_path),
        buffer_slots=32,
    )
    with Cluster(config) as running:
        assert _auto_turns(running.session(), tiny_llama, 510) == ["none", "pe", "pe"]


def test_two_prefill_and_two_decode_nodes_share_the_work_exactly(tiny_llama: Pair, tmp_path: Path) -> None:
    """2P2D: the scheduler spreads concurrent steps over both PEs and both DE groups, and split reads
    use every node's storage NIC; every output stays exact."""
    config = ClusterConfig(
        model=str(tiny_llama.path),
        prefill_nodes=2,
        decode_nodes=2,
        engine=EngineConfig(block_size=BLOCK, num_blocks=128),
        store=StoreConfig(root=tmp_path),
        buffer_slots=32,
    )
    with Cluster(config) as running:
        _agents_at_once(running, tiny_llama, agents=6, turns=2, seed=3000, plans=["auto"])
        read = {node.split("-", 1)[1]: r for node, (r, _) in running.storage_nic_bytes().items()}
        assert sorted(read) == ["de-node0", "de-node1", "pe-node0", "pe-node1"]
        assert all(r > 0 for r in read.values()), read


@pytest.mark.parametrize("floor", [0, 2 * BLOCK])
def test_chunked_prefill_under_a_tiny_compute_quota_is_exact(
    tiny_llama: Pair, tmp_path: Path, floor: int
) -> None:
    """A quota no request fits: every prompt is prefilled one block per batch (or two, the chunk
    floor), each chunk loading the earlier chunks' KV back from the DE buffer, over every read path."""
    config = ClusterConfig(
        model=str(tiny_llama.path),
        scheduler=SchedulerConfig(compute_quota_s=1e-9, min_chunk_tokens=floor),
        engine=EngineConfig(block_size=BLOCK, num_blocks=128),
        store=StoreConfig(root=tmp_path),
        buffer_slots=32,
    )
    with Cluster(config) as running:
        session = running.session()
        for turn, plan in enumerate(["pe", "pe", "de", "split"]):
            before, new = session.token_ids, _turn(600 + turn)
            result = session.step_tokens(new, max_tokens=NEW_TOKENS, ignore_eos=True, read_plan=plan)
            assert result.token_ids == hf_greedy(tiny_llama, before + new, NEW_TOKENS), f"turn {turn}"
            assert result.usage.cached_tokens == max(len(before) - 1, 0)
