"""The storage-NIC limiter: exact arithmetic with a fake clock, and the real rate across processes."""

from __future__ import annotations

import multiprocessing
import time
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

import pytest

from dualpath_sdk.errors import InvalidInput
from dualpath_sdk.store.limiter import StorageNicLimiter, granted_bytes


class FakeTime:
    """A clock whose sleep advances it: waits are computed, never slept."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds


def fake_limiter(
    tmp_path: Path, t: FakeTime, read: float | None, write: float | None = None
) -> StorageNicLimiter:
    return StorageNicLimiter("n0", read, write, burst_s=0.0, directory=tmp_path, clock=t.clock, sleep=t.sleep)


def test_waits_make_exactly_the_set_rate(tmp_path: Path) -> None:
    t = FakeTime()
    lim = fake_limiter(tmp_path, t, read=1000.0)
    start = t.now
    for size in (100, 2500, 1, 399, 1000):
        lim.acquire_read(size)
    assert t.now - start == pytest.approx(4000 / 1000.0)


def test_idle_time_is_not_saved_beyond_the_burst(tmp_path: Path) -> None:
    t = FakeTime()
    lim = StorageNicLimiter("n0", 1000.0, burst_s=0.5, directory=tmp_path, clock=t.clock, sleep=t.sleep)
    t.now += 100  # a long idle period earns only 0.5 s worth of bytes
    assert lim.acquire_read(500) == 0.0
    assert lim.acquire_read(1000) == pytest.approx(1.0)


def test_directions_are_separate_and_none_is_unlimited(tmp_path: Path) -> None:
    t = FakeTime()
    lim = fake_limiter(tmp_path, t, read=1000.0, write=None)
    assert lim.acquire_write(10**9) == 0.0
    assert lim.acquire_read(1000) == pytest.approx(1.0)


def test_two_openers_of_one_node_share_the_bucket(tmp_path: Path) -> None:
    t = FakeTime()
    a = fake_limiter(tmp_path, t, read=1000.0)
    b = fake_limiter(tmp_path, t, read=1000.0)
    assert a.acquire_read(1000) == pytest.approx(1.0)
    t.now -= 1.0  # as if b asked at the same instant: it queues behind a's bytes
    assert b.acquire_read(1000) == pytest.approx(2.0)


def test_granted_bytes_count_once_the_wait_is_over(tmp_path: Path) -> None:
    """Monitors see bytes when the cap lets them through (capped reads) or at once (uncapped writes)."""
    t = FakeTime()
    seen: list[tuple[float, float]] = []
    lim = StorageNicLimiter(
        "n0",
        1000.0,
        None,
        burst_s=0.0,
        directory=tmp_path,
        clock=t.clock,
        sleep=lambda s: (seen.append(granted_bytes("n0", tmp_path)), t.sleep(s)),
    )
    assert granted_bytes("n0", tmp_path) == (0.0, 0.0)
    lim.acquire_read(500)
    lim.acquire_write(300)
    assert seen == [(0.0, 0.0)]  # while the read waited it was not counted yet
    assert granted_bytes("n0", tmp_path) == (500.0, 300.0) == lim.granted()
    assert granted_bytes("other", tmp_path) == (0.0, 0.0)


def test_rejects_bad_names_and_rates(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput):
        StorageNicLimiter("../etc", 1.0, directory=tmp_path)
    with pytest.raises(InvalidInput):
        StorageNicLimiter("n0", -5.0, directory=tmp_path)


RATE = 40e6
CHUNK = 256 << 10
PER_PROC = 40


def _consumer(directory: str, go: EventType, done: Queue[float]) -> None:
    lim = StorageNicLimiter("node-a", RATE, directory=Path(directory))
    go.wait()
    for _ in range(PER_PROC):
        lim.acquire_read(CHUNK)
    done.put(time.monotonic())


def test_processes_of_one_node_together_get_the_set_rate_within_5_percent(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    go, done = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_consumer, args=(str(tmp_path), go, done)) for _ in range(4)]
    for p in procs:
        p.start()
    time.sleep(0.3)  # let every process open the limiter
    start = time.monotonic()
    go.set()
    ends = [done.get(timeout=30) for _ in procs]
    for p in procs:
        p.join()
    achieved = 4 * PER_PROC * CHUNK / (max(ends) - start)
    assert achieved == pytest.approx(RATE, rel=0.05)
