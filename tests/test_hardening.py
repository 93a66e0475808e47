"""A careless or hostile caller: every bad call gets a typed error and changes nothing, an engine
that meets a bad request fails that request alone and serves on, and closed means closed."""

from __future__ import annotations

import dataclasses
import inspect
import math
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dualpath_sdk as dp
from dualpath_sdk import errors
from dualpath_sdk.api.cluster import Cluster
from dualpath_sdk.api.inputs import StepOptions, turn_messages, validated
from dualpath_sdk.cluster.controller import Event, StepRequest
from dualpath_sdk.config import EngineConfig, StoreConfig
from dualpath_sdk.engine.sequence import SamplingParams
from tests.conftest import Pair, hf_greedy, mounted_tmpfs

BLOCK = 16


# ---- the boundary, without a cluster ---------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"max_tokens": 8.5},
        {"max_tokens": "8"},
        {"max_tokens": True},
        {"max_tokens": 0},
        {"temperature": math.nan},
        {"temperature": math.inf},
        {"temperature": -0.5},
        {"temperature": "0"},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"seed": 2**70},
        {"seed": -1},
        {"seed": 1.0},
        {"stop_token_ids": [-1]},
        {"stop_token_ids": "abc"},
        {"stop_token_ids": [1.5]},
        {"ignore_eos": "yes"},
        {"read_plan": "sideways"},
        {"max_token": 8},  # a typo is not ignored
    ],
)
def test_bad_step_options_are_invalid_input_naming_the_field(options: dict[str, object]) -> None:
    (name,) = options
    with pytest.raises(dp.InvalidInput, match=name):
        validated(StepOptions, "step options", options)


def test_good_step_options_become_sampling_params() -> None:
    opts = validated(
        StepOptions, "o", {"max_tokens": 3, "temperature": 1, "stop_token_ids": (5, 6), "seed": 7}
    )
    assert opts.sampling() == SamplingParams(3, 1.0, 1.0, 7, (5, 6), False)


@pytest.mark.parametrize(
    "turn",
    [
        5,
        None,
        "",
        [],
        [5],
        {"role": "banana", "content": "x"},
        {"role": "user", "content": None},
        {"role": "user", "content": 5},
        {"role": "user", "content": ""},
        {"content": "no role"},
        {"role": "user", "content": "x", "surprise": 1},
    ],
)
def test_bad_turns_are_invalid_input(turn: object) -> None:
    with pytest.raises(dp.InvalidInput):
        turn_messages(turn)


def test_an_engine_rechecks_params_that_skipped_their_constructor() -> None:
    """Unpickling skips __init__: engines call check() on what they receive."""
    params = SamplingParams()
    for field, bad in [("max_tokens", 8.5), ("temperature", math.nan), ("seed", 2**70), ("top_p", 2)]:
        broken = dataclasses.replace(params)
        object.__setattr__(broken, field, bad)
        with pytest.raises(dp.InvalidInput, match=field):
            broken.check()


def test_every_error_class_is_exported_and_crosses_the_wire_as_itself() -> None:
    classes = [
        c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, errors.DualPathError)
    ]
    assert len(classes) >= 10
    for cls in classes:
        assert getattr(dp, cls.__name__) is cls and cls.__name__ in dp.__all__
        again = errors.from_wire(errors.kind_of(cls("why")), "why")
        assert type(again) is cls and again.args == ("why",)
    assert type(errors.from_wire(errors.kind_of(RuntimeError("bug")), "bug")) is errors.DualPathError


# ---- against a running cluster ----------------------------------------------------------------------


def _local(pair: Pair, store: Path, **overrides: object) -> Cluster:
    return Cluster.local(
        pair.path,
        storage=store,
        engine=EngineConfig(block_size=BLOCK, num_blocks=256),
        buffer_slots=64,
        **overrides,
    )


@pytest.fixture(scope="module")
def cluster(chat_pair: Pair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with _local(chat_pair, tmp_path_factory.mktemp("store")) as running:
        yield running


def _end(events: queue.Queue[Event]) -> Event:
    """How a step submitted straight to the controller ended (tokens may come first)."""
    while isinstance(event := events.get(timeout=60), list):
        pass
    return event


def _pids(cluster: Cluster) -> dict[str, int]:
    return {eid: p.pid for eid, p in cluster._launcher.processes.items()}


def _prompt(seed: int, n: int = 40) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class _Streamer(threading.Thread):
    """Another agent's long greedy step, running while the bad calls come in."""

    def __init__(self, cluster: Cluster, seed: int, tokens: int) -> None:
        super().__init__()
        self.session = cluster.session()
        self.prompt = _prompt(seed)
        self.tokens = tokens
        self.output: list[int] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            result = self.session.step_tokens(self.prompt, max_tokens=self.tokens, ignore_eos=True)
            self.output = result.token_ids
        except BaseException as exc:
            self.error = exc


_ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(-5, 70000), max_size=3),
)
_OPTION = st.sampled_from(
    ["max_tokens", "temperature", "top_p", "seed", "stop_token_ids", "ignore_eos", "read_plan", "bogus"]
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    options=st.dictionaries(_OPTION, _ANY, max_size=3),
    turn=st.one_of(_ANY, st.text(max_size=20), st.fixed_dictionaries({"role": _ANY, "content": _ANY})),
)
def _fuzz_step(session: dp.Session, options: dict[str, object], turn: object) -> None:
    max_tokens = options.get("max_tokens", 2)
    if type(max_tokens) is int and max_tokens > 4:  # valid, but keep the step short
        max_tokens = 4
    options = {**options, "max_tokens": max_tokens}
    for call in (lambda: session.step(turn, **options), lambda: session.step_tokens(turn, **options)):  # type: ignore[arg-type]
        before = session.token_ids
        try:
            call()
        except dp.DualPathError:
            assert session.token_ids == before  # a refused step changed nothing


def test_fuzzed_calls_get_typed_errors_while_another_session_streams_exactly(
    cluster: Cluster, chat_pair: Pair
) -> None:
    pids = _pids(cluster)
    streamer = _Streamer(cluster, seed=1, tokens=600)
    streamer.start()
    _fuzz_step(session=cluster.session(system="You are terse."))
    streamer.join()
    assert streamer.error is None
    assert streamer.output == hf_greedy(chat_pair, streamer.prompt, 600)
    assert _pids(cluster) == pids, "no engine restarted"


def test_a_hostile_request_past_the_boundary_fails_alone_typed(cluster: Cluster, chat_pair: Pair) -> None:
    """Raw requests that skip the SDK's checks: each engine refuses them by kind and serves on."""
    pids = _pids(cluster)
    streamer = _Streamer(cluster, seed=2, tokens=200)
    streamer.start()
    controller = cluster._launcher.controller
    for field, bad in [
        ("max_tokens", 8.5),
        ("temperature", math.nan),
        ("seed", 2**70),
        ("max_tokens", 10**9),
    ]:
        params = SamplingParams(max_tokens=4)
        object.__setattr__(params, field, bad)
        _, events = controller.submit(StepRequest(_prompt(3), params, "default", []))
        error = events.get(timeout=60)  # refused before any token: ContextTooLong for 10**9 tokens
        assert isinstance(error, dp.InvalidInput), (field, error)
    error = _end(controller.submit(StepRequest([1, 2, 10**6], SamplingParams(), "default", []))[1])
    assert isinstance(error, dp.InvalidInput)
    streamer.join()
    assert streamer.error is None
    assert streamer.output == hf_greedy(chat_pair, streamer.prompt, 200)
    assert _pids(cluster) == pids
    assert controller.metrics.registry.get_sample_value("dualpath_step_retries_total") == 0


def test_a_prompt_too_long_for_the_engines_memory_is_context_too_long(cluster: Cluster) -> None:
    session = cluster.session()
    with pytest.raises(dp.ContextTooLong, match="buffer_slots"):
        session.step_tokens(_prompt(4, n=64 * BLOCK + 1), max_tokens=2)  # the DE buffer holds 64 blocks
    assert session.token_ids == []
    assert session.step_tokens([1, 2, 3], max_tokens=2, ignore_eos=True).usage.completion_tokens == 2


def test_a_chat_step_after_raw_token_steps_is_invalid_input(cluster: Cluster) -> None:
    session = cluster.session()
    session.step_tokens([1, 2, 3], max_tokens=2)
    with pytest.raises(dp.InvalidInput, match="step_tokens"):
        session.step("hello")


def test_chat_steps_validate_and_run(cluster: Cluster) -> None:
    session = cluster.session(system="You are terse.")
    result = session.step("run the tests", max_tokens=3)
    assert result.usage.completion_tokens >= 1
    with pytest.raises(dp.InvalidInput, match="role"):
        session.step({"role": "banana", "content": "x"})
    assert session.step({"role": "user", "content": "again"}, max_tokens=2).usage.cached_tokens > 0


@pytest.mark.parametrize(
    "kwargs", [{"tenant": "../x"}, {"tenant": "a" * 5000}, {"tenant": 5}, {"ttl_s": math.inf}, {"system": ""}]
)
def test_bad_session_arguments_are_invalid_input(cluster: Cluster, kwargs: dict[str, object]) -> None:
    with pytest.raises(dp.InvalidInput):
        cluster.session(**kwargs)  # type: ignore[arg-type]


def test_a_closed_session_refuses_at_once_and_resumes(cluster: Cluster) -> None:
    session = cluster.session()
    session.step_tokens([1, 2, 3], max_tokens=2)
    session.close()
    for call in (lambda: session.step_tokens([4]), lambda: session.step("x"), session.fork):
        with pytest.raises(dp.InvalidInput, match="closed"):
            call()
    assert cluster.resume(session.id).token_ids == session.token_ids


def test_a_closed_cluster_refuses_at_once_and_fails_steps_in_flight(chat_pair: Pair, tmp_path: Path) -> None:
    cluster = _local(chat_pair, tmp_path)
    session = cluster.session()
    session.step_tokens([1, 2, 3], max_tokens=2)
    before = session.token_ids
    streamer = _Streamer(cluster, seed=5, tokens=1500)
    streamer.start()
    while not streamer.session._busy.locked():
        time.sleep(0.01)
    cluster.close()
    streamer.join(timeout=30)
    assert isinstance(streamer.error, dp.EngineUnavailable)
    for call in (lambda: session.step_tokens([4]), cluster.session):
        with pytest.raises(dp.InvalidInput, match="closed"):
            call()
    with _local(chat_pair, tmp_path) as again:
        assert again.resume(session.id).token_ids == before


def test_the_store_may_be_given_as_a_store_config(chat_pair: Pair, tmp_path: Path) -> None:
    with pytest.raises(dp.InvalidInput, match="not both"):
        Cluster.local(chat_pair.path, storage=tmp_path, store=StoreConfig(root=tmp_path))
    engine = EngineConfig(block_size=BLOCK, num_blocks=256)
    with Cluster.local(chat_pair.path, store=StoreConfig(root=tmp_path / "a"), engine=engine) as cluster:
        assert cluster.config.store.root == tmp_path / "a"
        assert cluster.session().step_tokens([1, 2], max_tokens=2).usage.completion_tokens >= 1


# ---- one writer per session -------------------------------------------------------------------------


def test_two_handles_of_one_session_never_lose_a_turn(cluster: Cluster) -> None:
    first = cluster.session()
    first.step_tokens([1, 2, 3], max_tokens=2)
    second = cluster.resume(first.id)  # resumed while the first handle lives on
    first.step_tokens([4, 5], max_tokens=2)
    with pytest.raises(dp.SessionBusy, match="another handle"):
        second.step_tokens([6, 7], max_tokens=2)  # stale: it would overwrite the first's turn
    assert cluster.resume(first.id).token_ids == first.token_ids
    third = cluster.resume(first.id)
    streamer = threading.Thread(target=third.step_tokens, args=([8],), kwargs={"max_tokens": 400})
    streamer.start()
    while not third._busy.locked():
        time.sleep(0.005)
    with pytest.raises(dp.SessionBusy):
        first.step_tokens([9], max_tokens=2)  # the third handle holds the session's lease
    streamer.join()
    assert cluster.resume(first.id).token_ids == third.token_ids


_RACER = """
import sys
import dualpath_sdk as dp
from dualpath_sdk.config import EngineConfig

model, store, session_id, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
with dp.Cluster.local(model, storage=store, engine=EngineConfig(block_size=16, num_blocks=256)) as cluster:
    won = 0
    print("ready", flush=True)
    for i in range(rounds):
        try:
            session = cluster.resume(session_id)
            session.step_tokens([7, 7, i % 50 + 1], max_tokens=3, ignore_eos=True)
            won += 1
        except dp.SessionBusy:
            pass
    print("won", won, flush=True)
"""


def test_two_processes_racing_on_one_session_lose_nothing(chat_pair: Pair, cluster: Cluster) -> None:
    """Another process with its own cluster on the same store steps the same session in a loop, and
    so does this one: every step that succeeded is in the final history, each exactly once."""
    import subprocess
    import sys

    session = cluster.session()
    session.step_tokens([1, 2, 3], max_tokens=2, ignore_eos=True)
    start = len(session.token_ids)
    root = cluster.config.store.root
    child = subprocess.Popen(
        [sys.executable, "-c", _RACER, str(chat_pair.path), str(root), session.id, "12"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    won = busy = 0
    for i in range(12):
        try:
            cluster.resume(session.id).step_tokens([5, 5, i % 50 + 1], max_tokens=3, ignore_eos=True)
            won += 1
        except dp.SessionBusy:
            busy += 1
    out, _ = child.communicate(timeout=300)
    assert child.returncode == 0
    child_won = int(out.split()[-1])
    final = cluster.resume(session.id).token_ids
    assert len(final) == start + 6 * (won + child_won)  # each step added 3 new + 3 generated tokens
    turns = [final[i : i + 3] for i in range(start, len(final), 6)]
    assert sum(t[:2] == [5, 5] for t in turns) == won and sum(t[:2] == [7, 7] for t in turns) == child_won


# ---- failures that show ------------------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "mnt", "4m") as mount:
        yield mount


def test_a_store_that_cannot_be_written_fails_the_start_with_storage_error(
    chat_pair: Pair, tmpfs: Path
) -> None:
    import subprocess

    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    for root in (tmpfs, tmpfs / "new"):
        with pytest.raises(dp.StorageError, match="cannot be written"):
            _local(chat_pair, root)


def test_a_full_file_system_costs_persistence_not_steps_and_recovers(chat_pair: Pair, tmpfs: Path) -> None:
    reserve = 1 << 20
    store = StoreConfig(root=tmpfs / "store", reserve_bytes=reserve)
    engine = EngineConfig(block_size=BLOCK, num_blocks=256)
    with Cluster.local(chat_pair.path, store=store, engine=engine, buffer_slots=64) as cluster:
        session = cluster.session()
        first = session.step_tokens(_prompt(6, n=3 * BLOCK), max_tokens=BLOCK, ignore_eos=True)
        assert first.persist.blocks == 4 and first.persist.failed == 0  # 3 Full Blocks and a partial
        st = __import__("os").statvfs(tmpfs)
        ballast = tmpfs / "ballast"
        ballast.write_bytes(bytes(st.f_bavail * st.f_frsize - reserve - 8192))  # room for manifests only
        full = session.step_tokens(_prompt(7, n=2 * BLOCK), max_tokens=BLOCK, ignore_eos=True)
        assert full.persist.failed > 0 and full.persist.blocks == 0  # the step itself succeeded
        failed = cluster.metrics().get_sample_value("dualpath_persist_failed_blocks_total")
        assert failed == full.persist.failed
        ballast.unlink()  # space returns
        again = session.step_tokens(_prompt(8, n=BLOCK), max_tokens=BLOCK, ignore_eos=True)
        # the refused three Full Blocks, two new ones and the new partial block
        assert again.persist.failed == 0 and again.persist.blocks == 6
        assert again.usage.cached_tokens == 3 * BLOCK  # what the full disk refused was recomputed
        prompt = session.token_ids[:-BLOCK]
        assert again.token_ids == hf_greedy(chat_pair, prompt, BLOCK)
        resumed = cluster.resume(session.id)
        last = resumed.step_tokens([1, 2], max_tokens=2, ignore_eos=True)
        assert last.usage.cached_tokens == len(session.token_ids) - 1


def test_an_engine_restart_is_counted(chat_pair: Pair, tmp_path: Path) -> None:
    with _local(chat_pair, tmp_path) as cluster:
        old = cluster.kill_engine("de0")
        deadline = time.monotonic() + 60
        while cluster.metrics().get_sample_value("dualpath_engine_restarts_total", {"engine": "de0"}) != 1:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert _pids(cluster)["de0"] != old
        assert cluster.session().step_tokens([1, 2, 3], max_tokens=2).usage.completion_tokens >= 1


def test_a_prefill_engine_dying_leaves_the_steps_decoding_on_their_decode_engine(
    chat_pair: Pair, tmp_path: Path
) -> None:
    """Found by the fault benchmark: a PE's death used to fail the steps already decoding elsewhere."""
    with _local(chat_pair, tmp_path) as cluster:
        session = cluster.session(system="You are terse.")
        generated: list[int] = []
        for i, chunk in enumerate(session.stream("tell me a long story", max_tokens=600, ignore_eos=True)):
            generated += chunk.token_ids
            if i == 0:
                cluster.kill_engine("pe0")
        deadline = time.monotonic() + 30
        while cluster.metrics().get_sample_value("dualpath_engine_restarts_total", {"engine": "pe0"}) != 1:
            assert time.monotonic() < deadline, "the PE's death was never noticed"
            time.sleep(0.1)
        assert len(generated) == 600
        prompt = session.token_ids[: -len(generated)]
        assert generated == hf_greedy(chat_pair, prompt, 600)
