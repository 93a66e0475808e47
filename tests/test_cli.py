"""The command line: the operator commands on a store laid down here with FsStore and ManifestStore
(sessions list / show / delete, store usage, gc and its dry run), and the demo end to end on a tiny
model."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dualpath_sdk.cli import app
from dualpath_sdk.config import StoreConfig
from dualpath_sdk.kv.block import FullBlock, KVLayout
from dualpath_sdk.kv.keys import BlockKey, block_keys, namespace_key
from dualpath_sdk.store.admin import StoreAdmin
from dualpath_sdk.store.aligned import round_up
from dualpath_sdk.store.fs import FsStore
from dualpath_sdk.store.header import HEADER_BYTES
from dualpath_sdk.store.manifest import ManifestStore
from tests.conftest import Pair

LAYOUT = KVLayout(num_layers=2, block_size=4, num_kv_heads=1, head_dim=8)
ROOT = namespace_key("m", "float32", 4)
FILE_BYTES = HEADER_BYTES + round_up(LAYOUT.full_block_nbytes)  # what one block takes on disk
LONG_AGO = time.time() - 86_400.0
runner = CliRunner()


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def block(seed: int) -> FullBlock:
    data = np.random.default_rng(seed).integers(0, 256, LAYOUT.full_block_nbytes, dtype=np.uint8)
    return FullBlock(LAYOUT, bytearray(data.tobytes()))


@dataclass
class Laid:
    """What the fixture wrote, to compare the commands' figures with."""

    root: Path
    alpha: list[BlockKey]  # acme's session: 3 blocks stored and pinned, a 4th referenced but missing
    beta: list[BlockKey]  # default's session: 2 blocks stored and pinned
    expired: BlockKey  # referenced by nobody, its pin expired, last used a day ago
    stale: BlockKey  # an index row whose file is gone
    orphan: Path  # a block file the index does not know, a day old
    young_orphan: Path  # ... written just now: a writer between its rename and its index row


@pytest.fixture
def laid(tmp_path: Path) -> Laid:
    root = tmp_path / "store"
    old = Clock(LONG_AGO)
    store = FsStore(root, read_threads=1, clock=old)
    manifests = ManifestStore(root / "sessions")

    alpha_tokens = list(range(16))
    alpha = block_keys(ROOT, alpha_tokens, 4)
    for i, key in enumerate(alpha[:3]):
        store.put(key, None, 4, block(i))
    beta_tokens = list(range(100, 108))
    beta = block_keys(ROOT, beta_tokens, 4)
    for i, key in enumerate(beta):
        store.put(key, None, 4, block(10 + i))
    (expired, stale, orphan_key, young_key) = block_keys(ROOT, list(range(200, 216)), 4)
    for i, key in enumerate((expired, stale, orphan_key, young_key)):
        store.put(key, None, 4, block(20 + i))
    store.pin("gone", [expired], ttl_s=60.0)  # expired a day ago (real time)
    store.path_of(stale).unlink()
    for key in (orphan_key, young_key):
        store.index.remove(key)
    os.utime(store.path_of(orphan_key), (LONG_AGO, LONG_AGO))

    m = manifests.new(tenant="acme", session_id="alpha")
    messages = [
        {"role": "system", "content": "You are a coding agent."},
        {"role": "user", "content": "fix the failing tests"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "run_tests", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "3 failed, 6 passed in 0.21s"},
    ]
    manifests.save(m.model_copy(update={"token_ids": alpha_tokens, "messages": messages}).with_keys(alpha))
    m = manifests.new(session_id="beta")
    manifests.save(m.model_copy(update={"token_ids": beta_tokens}).with_keys(beta))
    store.index.clock = time.time  # live pins: pinned now, for an hour
    store.pin("alpha", alpha, ttl_s=3600.0)
    store.pin("beta", beta, ttl_s=3600.0)
    store.close()
    return Laid(root, alpha, beta, expired, stale, store.path_of(orphan_key), store.path_of(young_key))


def cli(*args: str) -> str:
    result = runner.invoke(app, list(args), env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def snapshot(
    root: Path,
) -> tuple[list[str], list[tuple[BlockKey, int, float]], list[tuple[str, BlockKey, float]]]:
    """Files, index rows and pins: everything gc could change."""
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "index" not in p.name)
    with StoreAdmin(StoreConfig(root=root)) as admin:
        return files, sorted(admin.store.index.entries()), sorted(admin.store.index.pins())


def test_sessions_list_and_tenant_filter(laid: Laid) -> None:
    out = cli("sessions", "list", "--storage", str(laid.root))
    assert re.search(r"alpha\s+│\s+acme\s+│\s+16\s+│\s+3/4", out), out
    assert re.search(r"beta\s+│\s+default\s+│\s+8\s+│\s+2/2", out), out
    assert "2 session(s)" in out
    out = cli("sessions", "list", "--tenant", "acme", "--storage", str(laid.root))
    assert "alpha" in out and "beta" not in out and "1 session(s)" in out


def test_sessions_show_messages_and_missing_blocks(laid: Laid) -> None:
    out = cli("sessions", "show", "alpha", "--storage", str(laid.root))
    assert "tenant acme, 16 tokens" in out
    assert "4 messages" in out and "calls run_tests" in out and "(result of c1)" in out
    assert "3 failed, 6 passed" in out
    assert f"4 referenced, 3 present ({3 * FILE_BYTES / 1024:.1f} KiB), 1 missing, 3 pinned" in out
    assert f"{laid.alpha[3].hex()} missing" in out  # the missing block is named
    out = cli("sessions", "show", "alpha", "--keys", "--storage", str(laid.root))
    assert all(f"{k.hex()} present pinned" in out for k in laid.alpha[:3])


def test_sessions_delete_drops_manifest_and_pins(laid: Laid) -> None:
    out = cli("sessions", "delete", "beta", "--storage", str(laid.root))
    assert "deleted session beta (tenant default), 2 pin(s) dropped" in out
    assert not (laid.root / "sessions" / "beta.manifest").exists()
    with StoreAdmin(StoreConfig(root=laid.root)) as admin:
        assert admin.store.index.pins("beta") == []
        assert all(admin.store.contains(k) for k in laid.beta)  # blocks stay until collected
    assert "beta" not in cli("sessions", "list", "--storage", str(laid.root))
    again = runner.invoke(app, ["sessions", "delete", "beta", "--storage", str(laid.root)])
    assert again.exit_code == 1 and "no session 'beta'" in again.output


def test_sessions_delete_with_blocks_keeps_shared_ones(laid: Laid) -> None:
    manifests = ManifestStore(laid.root / "sessions")
    gamma = manifests.new(session_id="gamma")
    manifests.save(gamma.with_keys(laid.alpha[:1]))  # shares alpha's first block
    store = FsStore(laid.root, read_threads=1)
    (leaf,) = block_keys(ROOT, list(range(300, 304)), 4)  # pinned by alpha, in no manifest (a partial block)
    store.put(leaf, None, 4, block(30))
    store.pin("alpha", [leaf], ttl_s=3600.0)
    store.close()
    out = cli("sessions", "delete", "alpha", "--blocks", "--storage", str(laid.root))
    assert "4 pin(s) dropped, 3 block(s) removed" in out
    with StoreAdmin(StoreConfig(root=laid.root)) as admin:
        assert [admin.store.contains(k) for k in [*laid.alpha, leaf]] == [True, False, False, False, False]
        assert {k for k, _, _ in admin.store.index.entries()} >= {laid.alpha[0], *laid.beta}
        assert not {laid.alpha[1], laid.alpha[2]} & {k for k, _, _ in admin.store.index.entries()}


def test_store_usage_matches_what_was_written(laid: Laid) -> None:
    with StoreAdmin(StoreConfig(root=laid.root)) as admin:
        u = admin.usage()
    # indexed: alpha's 3, beta's 2, the expired one and the stale row; not the two orphan files
    assert (u.blocks, u.stored_bytes) == (7, 7 * FILE_BYTES)
    assert (u.pinned_blocks, u.pinned_bytes, u.unpinned_bytes) == (5, 5 * FILE_BYTES, 2 * FILE_BYTES)
    assert (u.expired_pins, u.sessions, u.capacity_bytes) == (1, 2, None)
    out = cli("store", "--storage", str(laid.root), "--capacity", "1M")
    assert (
        f"({7 * FILE_BYTES:,} bytes) in 7 blocks, capacity 1.0 MiB ({7 * FILE_BYTES / 2**20:.1%} used)" in out
    )
    assert f"({5 * FILE_BYTES:,} bytes) in 5 blocks, live pins" in out
    assert f"({2 * FILE_BYTES:,} bytes) in 2 blocks, evictable" in out
    assert "sessions     2, expired pins 1" in out
    assert out == cli("store", "usage", "--storage", str(laid.root), "--capacity", "1M")


def test_gc_dry_run_removes_nothing(laid: Laid) -> None:
    before = snapshot(laid.root)
    out = cli("store", "gc", "--unreferenced", "--dry-run", "-v", "--storage", str(laid.root))
    assert snapshot(laid.root) == before
    assert "would remove 1 expired pin(s)" in out and f"gone {laid.expired.hex()}" in out
    assert "would remove 1 orphan block file(s)" in out and str(laid.orphan) in out
    assert "would remove 1 index row(s) without a file" in out and laid.stale.hex() in out
    assert "would remove 1 unreferenced block(s)" in out
    assert f"would free {2 * FILE_BYTES / 1024:.1f} KiB" in out


def test_gc_removes_orphans_and_expired_unreferenced_keeps_pinned(laid: Laid) -> None:
    out = cli("store", "gc", "--storage", str(laid.root))  # without --unreferenced
    assert "removed 1 expired pin(s)" in out and "removed 1 orphan block file(s)" in out
    assert "removed 1 index row(s) without a file" in out and "removed 0 unreferenced" in out
    assert not laid.orphan.exists() and laid.young_orphan.exists()  # too young: maybe mid-write
    with StoreAdmin(StoreConfig(root=laid.root)) as admin:
        assert admin.store.contains(laid.expired) and admin.store.index.pins("gone") == []

    out = cli("store", "gc", "--unreferenced", "-v", "--storage", str(laid.root))
    assert "removed 1 unreferenced block(s)" in out and laid.expired.hex() in out
    with StoreAdmin(StoreConfig(root=laid.root)) as admin:
        assert not admin.store.contains(laid.expired)
        kept = {k for k, _, _ in admin.store.index.entries()}
        assert kept == {*laid.alpha[:3], *laid.beta}  # pinned and referenced: kept
        assert all(admin.store.contains(k) for k in kept)
    assert laid.young_orphan.exists()
    out = cli("store", "gc", "--min-age", "0", "--storage", str(laid.root))
    assert "removed 1 orphan block file(s)" in out and not laid.young_orphan.exists()


def test_gc_unreferenced_needs_every_manifest_readable(laid: Laid) -> None:
    (laid.root / "sessions" / "broken.manifest").write_text("not a manifest")
    before = snapshot(laid.root)
    result = runner.invoke(app, ["store", "gc", "--unreferenced", "--storage", str(laid.root)])
    assert result.exit_code == 1 and "broken" in result.output
    assert snapshot(laid.root) == before
    assert "damaged" in cli("sessions", "list", "--storage", str(laid.root))


def test_no_store_is_an_error(tmp_path: Path) -> None:
    for args in (["store"], ["sessions", "list"], ["store", "gc"]):
        result = runner.invoke(app, [*args, "--storage", str(tmp_path / "nothing")])
        assert result.exit_code == 1 and "no store at" in result.output
        assert not (tmp_path / "nothing").exists()  # nothing created


def test_demo_end_to_end_on_a_tiny_model(chat_pair: Pair, tmp_path: Path) -> None:
    store = tmp_path / "store"
    args = ["demo", "--model", str(chat_pair.path), "--sessions", "2", "--turns", "3", "--max-tokens", "4"]
    out = cli(*args, "--storage", str(store), "--read-plan", "rotate")
    turns = re.findall(r"│ ?(s\d) +│ +(\d) │ +(\d+) │ +(\d+) │ (\w+) +│", out)
    assert len(turns) == 6, out
    for _, turn, prompt, cached, plan in turns:
        assert int(cached) < int(prompt)
        assert (plan == "none") == (turn == "1") and (int(cached) > 0) == (turn != "1")
    rows = re.findall(r"│ (s\d \w+) +│ +(\d+) │ +(\d+) │ +(\d+) │ +(\d+) │ +([\d.]+)x │", out)
    assert len(rows) == 2, out  # and the "all" row, whose label is no session's
    for _, prompt, cached, reused, cold, ratio in rows:
        assert 0 < int(cached) < int(prompt) and int(reused) > 0 and int(cold) > 0
        assert float(ratio) == pytest.approx(int(cold) / int(reused), rel=0.1, abs=0.1)
    m = re.search(r"cached tokens: (\d+) of (\d+) prompt tokens over 6 turns", out)
    assert m is not None and 0 < int(m.group(1)) < int(m.group(2)), out
    # the demo's sessions stay in the store it was given; the cold baseline's do not
    listed = cli("sessions", "list", "--storage", str(store))
    assert "2 session(s)" in listed and listed.count("demo ") == 2 and "demo-cold" not in listed
