"""Token-exact reuse: a session's trailing partial block is persisted, found and loaded, so every
history token whose KV was computed is loaded next turn, never recomputed (and never wrong)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch

from dualpath_sdk.api.cluster import Cluster
from dualpath_sdk.api.session import Session
from dualpath_sdk.config import ClusterConfig, EngineConfig, StoreConfig
from dualpath_sdk.engine.core import EngineCore
from dualpath_sdk.engine.sequence import FullBlockPrefix, SamplingParams
from dualpath_sdk.engine.sequence import Sequence as EngineSequence
from dualpath_sdk.kv.block import FullBlock
from dualpath_sdk.kv.keys import BlockKey, block_keys, chain_key, namespace_key, partial_key
from dualpath_sdk.store.header import decode_header
from dualpath_sdk.store.prefix import cached_prefix
from tests.conftest import Pair, hf_greedy

BLOCK = 16
ROOT = namespace_key("test-model", "float32", BLOCK)


# ---- keys -----------------------------------------------------------------------------------------


def test_partial_keys_bind_count_and_tokens_and_never_equal_a_full_key() -> None:
    tokens = list(range(100, 100 + BLOCK))
    parent = chain_key(ROOT, list(range(BLOCK)))
    keys = {partial_key(parent, tokens[:n]) for n in range(1, BLOCK)}
    assert len(keys) == BLOCK - 1  # one per token count
    assert partial_key(parent, [1, 2, 3]) != partial_key(parent, [1, 2, 4])  # tokens
    assert partial_key(parent, [1, 2, 3]) != partial_key(ROOT, [1, 2, 3])  # parent
    assert partial_key(parent, [0]) != partial_key(parent, [0, 0])  # count, even of equal tokens
    assert partial_key(parent, [1, 2, 3]) == partial_key(parent, (1, 2, 3))  # stable, any sequence
    full = {chain_key(parent, tokens[:n]) for n in range(1, BLOCK + 1)}
    assert not keys & full  # a partial key is never the chain key of the same tokens
    with pytest.raises(ValueError):
        partial_key(parent, [])


# ---- lookup ---------------------------------------------------------------------------------------


class FakeStore:
    """What cached_prefix asks of a store: presence of keys."""

    def __init__(self, keys: Sequence[BlockKey] = ()) -> None:
        self.keys = set(keys)

    def contains(self, key: BlockKey) -> bool:
        return key in self.keys

    def longest_prefix(self, keys: Sequence[BlockKey]) -> int:
        return next((i for i, k in enumerate(keys) if k not in self.keys), len(keys))


def _stored_after(history: list[int]) -> list[BlockKey]:
    """The blocks a step that ended with `history` stores: Full Blocks of the computed tokens (all
    but the last), then their partial block."""
    computed = history[:-1]
    full = block_keys(ROOT, computed, BLOCK)
    tail = computed[len(full) * BLOCK :]
    return full + ([partial_key(full[-1] if full else ROOT, tail)] if tail else [])


@pytest.mark.parametrize("history_len", [1, 2, 10, 16, 17, 18, 40, 48, 49])
@pytest.mark.parametrize("new", [1, 5, 30])
def test_the_cached_prefix_is_every_computed_history_token(history_len: int, new: int) -> None:
    history = list(range(1000, 1000 + history_len))
    prompt = history + list(range(new))
    store = FakeStore(_stored_after(history))
    keys, tokens = cached_prefix(store, ROOT, prompt, BLOCK, len(history))
    assert tokens == history_len - 1
    assert keys == _stored_after(history)
    # oracle (nothing stored) counts the same prefix
    assert cached_prefix(None, ROOT, prompt, BLOCK, len(history)) == (keys, tokens)


def test_a_missing_partial_block_or_full_block_shortens_the_prefix() -> None:
    history = list(range(1000, 1045))  # 44 computed tokens: 2 Full Blocks and a partial of 12
    prompt = [*history, 1, 2, 3]
    stored = _stored_after(history)
    keys, tokens = cached_prefix(FakeStore(stored[:2]), ROOT, prompt, BLOCK, len(history))
    assert (keys, tokens) == (stored[:2], 2 * BLOCK)
    # without the second Full Block, the partial block is never reached
    keys, tokens = cached_prefix(FakeStore([stored[0], stored[2]]), ROOT, prompt, BLOCK, len(history))
    assert (keys, tokens) == (stored[:1], BLOCK)
    # a fresh session (no history) finds Full Blocks another session stored, never a partial one
    keys, tokens = cached_prefix(FakeStore(stored), ROOT, prompt, BLOCK, 0)
    assert (keys, tokens) == (stored[:2], 2 * BLOCK)


def test_the_prefix_always_leaves_a_prompt_token_to_compute() -> None:
    prompt = list(range(2 * BLOCK + 1))
    everything = [*block_keys(ROOT, prompt, BLOCK), partial_key(ROOT, prompt[:5])]
    keys, tokens = cached_prefix(FakeStore(everything), ROOT, prompt, BLOCK, len(prompt))
    assert tokens == 2 * BLOCK == len(prompt) - 1 and len(keys) == 2


# ---- the engine imports a prefix that ends inside a block -------------------------------------------


def test_a_prefix_ending_inside_a_block_is_exact(tiny_llama: Pair) -> None:
    """The KV of 100 tokens (6 Full Blocks and a partial one), exported as a sequence finishes and
    imported into a fresh engine: the continuation is exact, the 100 tokens are not recomputed, and
    whatever the partial block holds past its tokens is never read."""
    g = torch.Generator().manual_seed(5)
    history = torch.randint(0, 512, (100,), generator=g).tolist()
    prompt = history + torch.randint(0, 512, (9,), generator=g).tolist()
    engine = EngineCore(tiny_llama.ours, EngineConfig(block_size=BLOCK, num_blocks=64))
    exported: list[FullBlock] = []

    def export(seq: EngineSequence) -> None:  # the pool still holds the finishing sequence's blocks
        exported.extend(engine.pool.export_block(b, FullBlock.empty(engine.layout)) for b in seq.block_table)

    engine.on_finish = export
    engine.generate([history], SamplingParams(max_tokens=1))
    blocks = exported[: -(-100 // BLOCK)]
    blocks[-1].tensor[:, 100 % BLOCK :] = 7.0  # garbage past the partial block's tokens
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    fresh = EngineCore(tiny_llama.ours, EngineConfig(block_size=BLOCK, num_blocks=64))
    seq = fresh.add(prompt, params, prefix=FullBlockPrefix(blocks, 100))
    while fresh.has_work:
        fresh.step()
    assert seq.num_cached == 100
    assert seq.output_ids == hf_greedy(tiny_llama, prompt, 12)


# ---- the cluster, over every read path ---------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tiny_llama: Pair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    config = ClusterConfig(
        model=str(tiny_llama.path),
        engine=EngineConfig(block_size=BLOCK, num_blocks=256),
        store=StoreConfig(root=tmp_path_factory.mktemp("store")),
        buffer_slots=64,
    )
    with Cluster(config) as running:
        yield running


def _turns(seed: int, n: int) -> list[tuple[list[int], int]]:
    """`n` turns (new tokens, tokens to generate) of odd sizes, chosen so that every step ends with
    a partial block: (tokens after the step - 1) is never a multiple of the block size."""
    g = torch.Generator().manual_seed(seed)
    turns, total = [], 0
    for t in range(n):
        new, gen = 37 if t == 0 else 3 + (7 * t) % 19, 1 + t % 6  # gen 1: the DE finishes at once
        if (total + new + gen - 1) % BLOCK == 0:
            new += 2
        total += new + gen
        turns.append((torch.randint(0, 512, (new,), generator=g).tolist(), gen))
    return turns


@pytest.mark.parametrize("plan", ["pe", "de", "split"])
def test_twenty_turns_reuse_every_computed_token_exactly(
    cluster: Cluster, tiny_llama: Pair, plan: str
) -> None:
    session = cluster.session()
    base = {"pe": 700, "de": 800, "split": 900}[plan]  # distinct tokens: no sharing between the tests
    token_bytes = None
    for turn, (new, gen) in enumerate(_turns(base, 20)):
        before = session.token_ids
        result = session.step_tokens(new, max_tokens=gen, ignore_eos=True, read_plan=plan)
        prompt = before + new
        assert result.token_ids == hf_greedy(tiny_llama, prompt, gen), f"turn {turn}"
        assert session.token_ids == prompt + result.token_ids
        if turn == 0:
            assert result.usage.cached_tokens == 0 and result.load.plan == "none"
            continue
        cached = result.usage.cached_tokens
        assert cached == len(before) - 1, f"turn {turn}"
        assert cached % BLOCK, "the turns are chosen so that a partial block ends every prefix"
        assert result.load.plan == plan
        read = result.load.bytes_pe + result.load.bytes_de
        token_bytes = token_bytes or read // cached
        assert read == cached * token_bytes  # a partial block costs its tokens' bytes, not a block's
        if plan == "pe":
            assert result.load.bytes_de == 0
        elif plan == "de":
            assert result.load.bytes_pe == 0
        else:
            assert result.load.bytes_pe > 0 and result.load.bytes_de > 0


def _partial_block_file(cluster: Cluster, session: Session) -> Path:
    """The store file of the partial block the session's last step wrote."""
    computed = len(session.token_ids) - 1
    full = computed // BLOCK
    parent = bytes.fromhex(session._manifest.block_keys[full - 1])
    for path in (Path(cluster.config.store.root) / "blocks").rglob("*.kv"):
        header = decode_header(path.read_bytes()[:4096])
        if header is not None and header[1] == parent and header[2] == computed - full * BLOCK:
            return path
    raise AssertionError("no partial block was stored")


@pytest.mark.parametrize("plan", ["pe", "de"])
def test_a_corrupted_partial_block_costs_a_recompute_of_the_tail_only(
    cluster: Cluster, tiny_llama: Pair, plan: str
) -> None:
    session = cluster.session()
    turns = _turns({"pe": 1100, "de": 1200}[plan], 4)
    for new, gen in turns[:2]:
        session.step_tokens(new, max_tokens=gen, ignore_eos=True, read_plan=plan)
    path = _partial_block_file(cluster, session)
    data = bytearray(path.read_bytes())
    data[4096 + 10] ^= 0xFF
    path.write_bytes(bytes(data))
    before = session.token_ids
    new, gen = turns[2]
    result = session.step_tokens(new, max_tokens=gen, ignore_eos=True, read_plan=plan)
    assert result.usage.cached_tokens == (len(before) - 1) // BLOCK * BLOCK  # the Full Blocks only
    assert result.token_ids == hf_greedy(tiny_llama, before + new, gen)
    # the recomputed tail is persisted again: the next turn reuses everything
    before = session.token_ids
    new, gen = turns[3]
    result = session.step_tokens(new, max_tokens=gen, ignore_eos=True, read_plan=plan)
    assert result.usage.cached_tokens == len(before) - 1
    assert result.token_ids == hf_greedy(tiny_llama, before + new, gen)
