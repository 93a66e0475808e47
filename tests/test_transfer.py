"""The one-sided transport: real processes, real shared memory, a real Mooncake transfer engine.

Every transport test runs on `local` and on `mooncake` (TCP over loopback; skipped, with the reason,
when the wheel or the libibverbs1 it links against is missing). The link's arithmetic is checked
exactly with a fake clock, then its priority behaviour with real processes on a rate-limited link.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from multiprocessing.queues import Queue
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any

import pytest
import torch

from dualpath_sdk.config import TransferConfig
from dualpath_sdk.errors import InvalidInput, TransferError
from dualpath_sdk.kv.block import FullBlock, KVLayout
from dualpath_sdk.transfer import PriorityLink, RegionDescriptor, TransferOp, Transport, open_transport


def _mooncake_missing() -> str | None:
    try:
        import mooncake.engine  # noqa: F401
    except ImportError as exc:
        return f"mooncake transfer engine unavailable (wheel or libibverbs1 missing): {exc}"
    return None


_MISSING = _mooncake_missing()
BACKENDS = [
    "local",
    pytest.param("mooncake", marks=pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")),
]
# The default model (SmolLM2-135M): 30 layers, 3 KV heads of 64 dims, fp32 -> 96 KiB Layer Blocks.
LAYOUT = KVLayout(num_layers=30, block_size=64, num_kv_heads=3, head_dim=64)
MiB = 1 << 20
CTX = multiprocessing.get_context("spawn")


def _config(backend: str, **kw: Any) -> TransferConfig:
    return TransferConfig(backend=backend, timeout_s=10.0, **kw)


def _pattern(n: int) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.int64) % 251).to(torch.uint8)


# ---- processes (top-level functions: spawn imports this module in the child) ----


def _owner(backend: str, nbytes: int, out: Queue[Any], cmds: Queue[Any]) -> None:
    """A DE: allocates a region whose second half holds a known pattern, then answers byte requests."""
    transport = open_transport(_config(backend))
    region = transport.allocate("de-buffer", nbytes)
    region.tensor[nbytes // 2 :] = _pattern(nbytes - nbytes // 2)
    out.put(region.descriptor)
    while (cmd := cmds.get(timeout=60))[0] == "bytes":
        _, offset, n = cmd
        out.put(region.tensor[offset : offset + n].numpy().tobytes())
    if cmd[0] == "close":
        region.close()
        out.put("closed")
        cmds.get(timeout=60)


def _witness(backend: str, nbytes: int, conn: Connection) -> None:
    """A DE told over a pipe that a write of `n` bytes at offset 0 completed: it answers whether the
    last byte, the one that changed, is already `value` in its region."""
    transport = open_transport(_config(backend))
    region = transport.allocate("de-buffer", nbytes)
    conn.send(region.descriptor)
    while (msg := conn.recv()) is not None:
        n, value = msg
        conn.send(int(region.tensor[n - 1]) == value)
    region.close()
    transport.close()


def _stream(
    backend: str,
    config: TransferConfig,
    node: str,
    cls: str,
    descriptor: RegionDescriptor,
    window: tuple[float, float],
    go: EventType,
    t0: Synchronized[float],
    out: Queue[Any],
) -> None:
    """A sender of one traffic class: back-to-back 1 MiB writes during `window` (seconds after t0);
    reports the completion time and size of every write."""
    transport = open_transport(config, node)
    src = transport.allocate(f"src-{cls}", MiB)
    remote = transport.attach(descriptor)
    offset = 0 if cls == "model" else MiB
    out.put("ready")
    go.wait(60)
    start, stop = t0.value + window[0], t0.value + window[1]
    time.sleep(max(0.0, start - time.monotonic()))
    done: list[tuple[float, int]] = []
    while time.monotonic() < stop:
        transport.write(src, 0, remote, offset, MiB, cls=cls).wait()  # type: ignore[arg-type]
        done.append((time.monotonic() - t0.value, MiB))
    out.put(done)
    transport.close()


class Peer:
    """A spawned owner process and the queues to talk to it."""

    def __init__(self, backend: str, nbytes: int) -> None:
        self.out: Queue[Any] = CTX.Queue()
        self.cmds: Queue[Any] = CTX.Queue()
        self.proc = CTX.Process(target=_owner, args=(backend, nbytes, self.out, self.cmds), daemon=True)
        self.proc.start()
        self.descriptor: RegionDescriptor = self.out.get(timeout=60)

    def bytes(self, offset: int, n: int) -> torch.Tensor:
        self.cmds.put(("bytes", offset, n))
        return torch.frombuffer(bytearray(self.out.get(timeout=30)), dtype=torch.uint8)

    def stop(self) -> None:
        if self.proc.is_alive():
            self.cmds.put(("stop",))
        self.proc.join(10)


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def transport(backend: str) -> Iterator[Transport]:
    with open_transport(_config(backend)) as t:
        yield t


@pytest.fixture(scope="module")
def peer(backend: str) -> Iterator[Peer]:
    p = Peer(backend, 8 * MiB)
    yield p
    p.stop()


# ---- regions ----


def test_allocate_gives_a_zeroed_region_and_a_picklable_descriptor(transport: Transport) -> None:
    import pickle

    region = transport.allocate("pe-buffer", 3 * MiB + 5)
    assert region.tensor.dtype == torch.uint8 and region.tensor.is_contiguous()
    assert region.nbytes == region.tensor.numel() == 3 * MiB + 5
    assert int(region.tensor.count_nonzero()) == 0
    assert pickle.loads(pickle.dumps(region.descriptor)) == region.descriptor
    region.close()


def test_register_an_existing_tensor_where_the_backend_can(transport: Transport, peer: Peer) -> None:
    block = FullBlock.empty(LAYOUT)
    block.raw.copy_(_pattern(block.raw.numel()))
    if transport.backend == "local":
        with pytest.raises(InvalidInput):  # private memory cannot be mapped by another process
            transport.register("kv", block.raw)
        return
    region = transport.register("kv", block.tensor)  # a typed view: registered as its bytes, no copy
    assert region.tensor.data_ptr() == block.raw.data_ptr()
    remote = transport.attach(peer.descriptor)
    transport.write(region, 0, remote, 0, LAYOUT.layer_block_nbytes).wait()
    assert torch.equal(peer.bytes(0, LAYOUT.layer_block_nbytes), block.layer_bytes(0))
    region.close()


def test_out_of_range_ops_are_refused_before_anything_moves(transport: Transport, peer: Peer) -> None:
    region = transport.allocate("small", 4096)
    remote = transport.attach(peer.descriptor)
    with pytest.raises(InvalidInput):
        transport.write(region, 0, remote, 8 * MiB - 100, 4096)
    with pytest.raises(InvalidInput):
        transport.read(region, 1, remote, 0, 4096)
    with pytest.raises(InvalidInput):
        transport.write(region, 0, remote, 0, 10, cls="bulk")  # type: ignore[arg-type]
    region.close()


# ---- moving bytes between two processes ----


def test_write_then_read_between_two_processes(transport: Transport, peer: Peer) -> None:
    mine = transport.allocate("pe-buffer", 8 * MiB)
    mine.tensor.random_(0, 256, generator=torch.Generator().manual_seed(1))
    remote = transport.attach(peer.descriptor)
    transport.write(mine, 1000, remote, 12345, 3 * MiB).wait()
    assert torch.equal(peer.bytes(12345, 3 * MiB), mine.tensor[1000 : 1000 + 3 * MiB])
    transport.read(mine, 0, remote, 4 * MiB, 4 * MiB).wait()  # the peer's pattern half
    assert torch.equal(mine.tensor[: 4 * MiB], _pattern(4 * MiB))
    mine.close()


def test_reads_and_writes_to_one_peer_may_run_on_two_threads_at_once(
    transport: Transport, peer: Peer
) -> None:
    """A PE loads layer k+1 and sends layer k-1 to the same DE region at the same time."""
    mine = transport.allocate("two-threads", 2 * MiB)
    remote = transport.attach(peer.descriptor)
    errors: list[Exception] = []

    def hammer(write: bool) -> None:
        move = transport.write if write else transport.read
        try:
            for i in range(1500):
                move(mine, (i % 16) * 4096 + (MiB if write else 0), remote, (i % 16) * 4096, 4096).wait()
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(write,)) for write in (True, False)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    mine.close()
    assert not errors, errors[0]


def test_batched_layer_block_writes_land_at_their_offsets(transport: Transport, peer: Peer) -> None:
    n = LAYOUT.layer_block_nbytes
    mine = transport.allocate("full-block", LAYOUT.full_block_nbytes)
    mine.tensor.random_(0, 256, generator=torch.Generator().manual_seed(2))
    block = FullBlock(LAYOUT, mine.tensor)
    remote = transport.attach(peer.descriptor)
    # Layer Blocks in reverse order: layer i lands where layer (L-1-i) sits in the source.
    last = LAYOUT.num_layers - 1
    ops = [TransferOp(mine, i * n, remote, (last - i) * n, n) for i in range(LAYOUT.num_layers)]
    transport.write_batch(ops).wait()
    got = peer.bytes(0, LAYOUT.full_block_nbytes)
    for i in range(LAYOUT.num_layers):
        assert torch.equal(got[(last - i) * n : (last - i + 1) * n], block.layer_bytes(i)), f"layer {i}"
    mine.close()


def test_a_completed_write_is_in_the_peers_memory_before_a_message_about_it_arrives(
    backend: str, transport: Transport
) -> None:
    """The PE waits for its write, then tells the DE over another channel, which reads at once.
    A transport that completes a write once its last bytes leave the sender (Mooncake's legacy TCP
    framing, MC_TCP_PROTO=1) showed stale bytes here in 8 runs of 8, at sizes from 4 KiB up."""
    parent, child = CTX.Pipe()
    proc = CTX.Process(target=_witness, args=(backend, 32 * MiB, child), daemon=True)
    proc.start()
    remote = transport.attach(parent.recv())
    mine = transport.allocate("pe-buffer", 32 * MiB)
    sizes = [4096 << k for k in range(14)]  # 4 KiB .. 32 MiB
    stale = []
    for step in range(10 * len(sizes)):
        n, value = sizes[step % len(sizes)], step % 255 + 1  # differs from what the last round left
        mine.tensor[n - 1] = value
        transport.write(mine, 0, remote, 0, n).wait()
        parent.send((n, value))
        if not parent.recv():
            stale.append(n)
    parent.send(None)
    proc.join(10)
    mine.close()
    assert not stale, f"completed writes not yet visible at the peer: {stale}"


def test_a_peer_killed_mid_transfer_gives_transfer_error_not_a_hang(backend: str, tmp_path: Path) -> None:
    victim = Peer(backend, 32 * MiB)
    # 32 MiB at 20 MB/s takes 1.7 s: the kill lands in the middle.
    config = _config(backend, link_bps=20e6, chunk_bytes=256 << 10, shm_dir=tmp_path)  # link file
    with open_transport(config, "pe0") as t:
        mine = t.allocate("pe-buffer", 32 * MiB)
        remote = t.attach(victim.descriptor)
        pending = t.write(mine, 0, remote, 0, 32 * MiB)
        time.sleep(0.3)
        victim.proc.kill()  # SIGKILL
        killed = time.monotonic()
        with pytest.raises(TransferError):
            pending.wait()
        assert time.monotonic() - killed < 3.0  # far inside the 10 s timeout: detected, not timed out
        with pytest.raises(TransferError):  # and every later op fails at once
            t.write(mine, 0, remote, 0, 4096).wait(5.0)
        mine.close()
    victim.proc.join(10)


@pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")
def test_a_peer_killed_under_a_train_of_mooncake_writes_fails_them_at_once() -> None:
    """Unshaped writes are in the engine together: those the kill cuts off fail, none waits out its
    deadline."""
    victim = Peer("mooncake", 32 * MiB)
    with open_transport(_config("mooncake")) as t:
        mine = t.allocate("pe-buffer", 4 * MiB)
        remote = t.attach(victim.descriptor)
        pending = [t.write(mine, 0, remote, (i % 8) * 4 * MiB, 4 * MiB) for i in range(64)]  # 256 MiB
        pending[0].wait()
        victim.proc.kill()  # SIGKILL
        killed = time.monotonic()
        failed = 0
        for done in pending[1:]:
            try:
                done.wait()
            except TransferError:
                failed += 1
        assert time.monotonic() - killed < 3.0
        assert failed > 0
        mine.close()
    victim.proc.join(10)


@pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")
def test_mooncake_refuses_the_legacy_tcp_framing(monkeypatch: pytest.MonkeyPatch) -> None:
    """MC_TCP_PROTO=1 completes a write before the peer has the bytes: the transport will not start."""
    monkeypatch.setenv("MC_TCP_PROTO", "1")
    with pytest.raises(TransferError, match="MC_TCP_PROTO"):
        open_transport(_config("mooncake"))


def test_local_closed_regions_fail_and_dead_owners_files_are_swept() -> None:
    config = _config("local")
    victim = Peer("local", MiB)
    with open_transport(config) as t:
        remote = t.attach(victim.descriptor)
        mine = t.allocate("pe-buffer", MiB)
        t.write(mine, 0, remote, 0, MiB).wait()
        victim.cmds.put(("close",))
        assert victim.out.get(timeout=30) == "closed"
        with pytest.raises(TransferError, match="closed"):
            t.write(mine, 0, remote, 0, MiB).wait()
        victim.cmds.put(("stop",))
        victim.proc.join(10)

        crashed = Peer("local", MiB)
        crashed.proc.kill()  # SIGKILL
        crashed.proc.join(10)
        assert Path(crashed.descriptor.endpoint).exists()  # a SIGKILLed owner cannot clean up
        t.allocate("another", 4096).close()
        assert not Path(crashed.descriptor.endpoint).exists()
        with pytest.raises(TransferError):
            t.attach(crashed.descriptor)
        mine.close()


# ---- the link's two classes, exactly (fake clock) ----


class FakeTime:
    """A clock whose sleep advances it: waits are computed, never slept."""

    def __init__(self) -> None:
        self.now = 100.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def _fake_link(tmp_path: Path, t: FakeTime, grace: float = 0.5) -> PriorityLink:
    return PriorityLink("n0", 1000.0, 0.0, grace, tmp_path, clock=t.clock, sleep=t.sleep)


def test_kv_alone_gets_the_whole_link(tmp_path: Path) -> None:
    t = FakeTime()
    link = _fake_link(tmp_path, t)
    start = t.now
    for _ in range(10):
        link.acquire("kv", "write", 250)
    assert t.now - start == pytest.approx(2.5)


def test_kv_yields_to_model_and_model_never_waits_for_queued_kv(tmp_path: Path) -> None:
    t = FakeTime()
    link = _fake_link(tmp_path, t, grace=0.5)
    assert link.acquire("model", "write", 1000) == pytest.approx(1.0)
    t.now -= 1.0  # as if kv asked at the instant model reserved: it waits out model's bytes + grace
    assert link.acquire("kv", "write", 100) == pytest.approx(1.5 + 0.1)
    assert link.acquire("model", "write", 100) == pytest.approx(0.1)  # only the one kv chunk in flight
    assert link.acquire("kv", "read", 100) == pytest.approx(0.1)  # the other direction is its own link


def test_kv_waiting_past_its_deadline_raises(tmp_path: Path) -> None:
    t = FakeTime()
    link = _fake_link(tmp_path, t)
    link.acquire("model", "write", 1000)
    t.now -= 1.0
    with pytest.raises(TransferError):
        link.acquire("kv", "write", 100, deadline=t.now + 1.0)


# ---- priority on a real, rate-limited link shared by processes ----


def _rate(done: list[tuple[float, int]], lo: float, hi: float) -> float:
    return sum(n for at, n in done if lo <= at < hi) / (hi - lo)


def test_kv_takes_only_what_model_leaves_on_a_shared_link(
    backend: str, transport: Transport, tmp_path: Path
) -> None:
    rate = 40e6
    config = _config(backend, link_bps=rate, chunk_bytes=256 << 10, shm_dir=tmp_path)
    node = "pe0"
    target = transport.allocate("de-buffer", 2 * MiB)
    go, t0, out = CTX.Event(), CTX.Value("d", 0.0), CTX.Queue()
    windows = {"kv": (0.0, 3.0), "model": (1.0, 2.0)}
    procs = [
        CTX.Process(
            target=_stream, args=(backend, config, node, cls, target.descriptor, w, go, t0, out), daemon=True
        )
        for cls, w in windows.items()
    ]
    for p in procs:
        p.start()
    assert [out.get(timeout=60) for _ in procs] == ["ready", "ready"]
    t0.value = time.monotonic() + 0.2
    go.set()
    results = [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(10)
    kv, model = sorted(results, key=lambda d: d[0][0])  # kv starts first
    shares = {
        "kv alone": _rate(kv, 0.1, 0.9) / rate,
        "kv under model": _rate(kv, 1.15, 1.85) / rate,
        "kv after model": _rate(kv, 2.15, 2.95) / rate,
        "model": _rate(model, 1.0, 2.0) / rate,
    }
    assert shares["kv alone"] >= 0.8, shares  # alone: the whole link
    assert shares["kv under model"] <= 0.1, shares  # under model traffic: collapses
    assert shares["kv after model"] >= 0.8, shares  # model gone: all of it again
    assert shares["model"] >= 0.85, shares  # model is not slowed by kv
    target.close()


# ---- mooncake's sockets ----


@pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")
@pytest.mark.skipif(shutil.which("ss") is None, reason="ss (iproute2) is not installed")
def test_mooncake_engine_listens_where_its_descriptor_says() -> None:
    """The engine is started for 127.0.0.1 and peers reach it there; the sockets themselves bind the
    wildcard address (Mooncake 0.3.13 offers no loopback-only bind for them): we record it."""
    with open_transport(_config("mooncake")) as t:
        region = t.allocate("probe", 4096)
        host, port = region.descriptor.endpoint.rsplit(":", 1)
        assert host == "127.0.0.1"
        lines = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
        ours = [line.split()[3] for line in lines.splitlines() if f"pid={os.getpid()}," in line]
        assert any(re.search(rf":{port}$", addr) for addr in ours), ours
        region.close()
