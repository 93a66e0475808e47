"""Paged attention (the csrc/ kernel and torch's paged path) against a plain reference, against each
other, against transformers, and reuse against recompute, over blocks scattered across the pool."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import dualpath_sdk.model.attention as attention_module
import dualpath_sdk.model.kernel as kernel_module
from dualpath_sdk.config import EngineConfig
from dualpath_sdk.engine.core import EngineCore
from dualpath_sdk.engine.sequence import FullBlockPrefix, SamplingParams
from dualpath_sdk.model.attention import AttentionBatch, SeqSlice, attention, backend_for, force_backend
from dualpath_sdk.model.kernel import kernel_op
from tests.conftest import Pair, hf_greedy

BLOCK = 16
PATHS = ("kernel", "paged")
# what torch.utils.cpp_extension needs: a C++ compiler and this Python's headers
NO_COMPILER = (shutil.which("g++") is None and shutil.which("c++") is None) or not (
    Path(sysconfig.get_paths()["include"]) / "Python.h"
).exists()


def _need_kernel() -> None:
    """The kernel must have built where a compiler exists (a failed build is a failure there)."""
    if NO_COMPILER:
        pytest.skip("no C++ compiler or Python headers: the csrc/ kernel cannot build here (torch path)")
    assert kernel_op() is not None, "the csrc/ paged attention kernel did not build (see the log)"


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test on one paged path."""
    if request.param == "kernel":
        _need_kernel()
    with force_backend(request.param):
        yield request.param


def _tokens(pair: Pair, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, pair.ours.spec.vocab_size, (n,), generator=g).tolist()


def _scattered(num_blocks: int, seed: int = 0) -> list[int]:
    return torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()


# ---- the attention call alone ------------------------------------------------------------------


def _reference(q: torch.Tensor, kv: torch.Tensor, seqs: list[SeqSlice], window: int | None) -> torch.Tensor:
    """Softmax attention written out in float64, keys gathered in logical order, one query at a time."""
    heads, kv_heads, bs = q.shape[1], kv.shape[3], kv.shape[1]
    out, row = torch.empty_like(q), 0
    for s in seqs:
        for i in range(s.new):
            pos = s.start + i
            lo = 0 if window is None else max(0, pos - window + 1)
            keys = torch.stack([kv[s.block_table[t // bs], t % bs] for t in range(lo, pos + 1)]).double()
            k = keys[:, 0].repeat_interleave(heads // kv_heads, dim=1)  # [L, heads, D]
            v = keys[:, 1].repeat_interleave(heads // kv_heads, dim=1)
            scores = torch.einsum("hd,lhd->hl", q[row].double(), k) / q.shape[-1] ** 0.5
            out[row] = torch.einsum("hl,lhd->hd", scores.softmax(-1), v).to(q.dtype)
            row += 1
    return out


Batch = tuple[list[SeqSlice], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _mixed_batch(
    heads: int, kv_heads: int, dim: int, block: int, shapes: list[tuple[int, int]], seed: int
) -> Batch:
    """Sequences of (cached, new) tokens over blocks drawn at random from a larger pool (7 spare)."""
    g = torch.Generator().manual_seed(seed)
    used = [-(-(start + new) // block) for start, new in shapes]
    pool = sum(used) + 7
    order = torch.randperm(pool, generator=g).tolist()
    seqs, taken = [], 0
    for (start, new), n in zip(shapes, used, strict=True):
        seqs.append(SeqSlice(start, new, order[taken : taken + n]))
        taken += n
    tokens = sum(new for _, new in shapes)
    kv = torch.randn(pool, block, 2, kv_heads, dim, generator=g)
    q, k, v = (torch.randn(tokens, h, dim, generator=g) for h in (heads, kv_heads, kv_heads))
    return seqs, kv, q, k, v


MIXED = [(37, 1), (0, 50), (100, 7), (64, 1), (5, 90), (0, 1)]  # decode steps, fresh and chunked prefills


@pytest.mark.parametrize(
    "heads,kv_heads,dim,block,window",
    [
        (4, 2, 16, 16, None),
        (4, 2, 16, 16, 24),
        (9, 3, 64, 64, None),
        (9, 3, 64, 64, 40),
        (8, 8, 128, 16, 9),
        (6, 2, 32, 8, None),
    ],
)
def test_paged_paths_match_the_reference_on_a_mixed_scattered_batch(
    path: str, heads: int, kv_heads: int, dim: int, block: int, window: int | None
) -> None:
    seqs, kv, q, k, v = _mixed_batch(heads, kv_heads, dim, block, MIXED, seed=dim + block)
    out = attention(q, k, v, kv, AttentionBatch.build(seqs, block), window)
    torch.testing.assert_close(out, _reference(q, kv, seqs, window), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["gather", "paged", "kernel"])
def test_a_one_token_prompt_attends_to_itself_only(name: str) -> None:
    """Position 0, one query: the rest of its block is never attended to, whatever it holds."""
    if name == "kernel":
        _need_kernel()
    seqs, kv, q, k, v = _mixed_batch(4, 2, 16, BLOCK, [(0, 1)], seed=5)  # the pool is random, not zero
    with force_backend(name):
        out = attention(q, k, v, kv, AttentionBatch.build(seqs, BLOCK), None)
    torch.testing.assert_close(out, _reference(q, kv, seqs, None), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("window", [None, 33])
def test_kernel_and_torch_fallback_agree_on_the_same_inputs(window: int | None) -> None:
    _need_kernel()
    seqs, kv, q, k, v = _mixed_batch(9, 3, 64, 64, [(2000, 1), (500, 130), (0, 70), (130, 1)], seed=3)
    outs = {}
    for name in ("kernel", "paged", "gather"):
        with force_backend(name):
            outs[name] = attention(q, k, v, kv.clone(), AttentionBatch.build(seqs, 64), window)
    torch.testing.assert_close(outs["kernel"], outs["paged"], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(outs["kernel"], outs["gather"], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_paths_read_16_bit_pools_as_their_float32_values(path: str, dtype: torch.dtype) -> None:
    """A 16-bit pool (EngineConfig.kv_dtype) under float32 queries: the new K/V are rounded as they are
    stored, and every path attends over the widened values, as over a float32 pool holding them."""
    seqs, kv, q, k, v = _mixed_batch(9, 3, 64, 16, MIXED, seed=11)
    batch = AttentionBatch.build(seqs, 16)
    narrow, wide = kv.to(dtype), kv.to(dtype).float()
    out = attention(q, k, v, narrow, batch, None)
    assert out.dtype == torch.float32
    expected = attention(q, k.to(dtype).float(), v.to(dtype).float(), wide, batch, None)
    assert torch.equal(narrow.float(), wide)  # the same keys stored, rounded once
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out, _reference(q, wide, seqs, None), atol=2e-5, rtol=1e-4)


def test_the_paths_read_the_block_table_not_the_pool_order(path: str) -> None:
    """The same keys in another order of blocks give the same output; a wrong table does not."""
    seqs, kv, q, k, v = _mixed_batch(4, 2, 16, 16, [(70, 1), (40, 20)], seed=5)
    base = attention(q, k, v, kv.clone(), AttentionBatch.build(seqs, 16), None)
    perm = torch.randperm(kv.shape[0], generator=torch.Generator().manual_seed(9))
    moved = torch.empty_like(kv)
    moved[perm] = kv  # block b now lives at perm[b]
    renamed = [SeqSlice(s.start, s.new, [int(perm[b]) for b in s.block_table]) for s in seqs]
    again = attention(q, k, v, moved, AttentionBatch.build(renamed, 16), None)
    torch.testing.assert_close(again, base, atol=1e-6, rtol=1e-6)
    spare = next(b for b in range(kv.shape[0]) if all(b not in s.block_table for s in seqs))
    wrong = [SeqSlice(s.start, s.new, [spare, *s.block_table[1:]]) for s in seqs]  # another block's keys
    for i in range(len(seqs)):
        out = attention(
            q, k, v, kv.clone(), AttentionBatch.build([*seqs[:i], wrong[i], *seqs[i + 1 :]], 16), None
        )
        rows = slice(sum(s.new for s in seqs[:i]), sum(s.new for s in seqs[: i + 1]))
        assert not torch.allclose(out[rows], base[rows], atol=1e-3)


def test_kernel_at_one_thread_starts_no_threads() -> None:
    """Engines run one torch thread each: the kernel must not add any (no oversubscription)."""
    _need_kernel()
    torch.set_num_threads(1)
    seqs, kv, q, k, v = _mixed_batch(9, 3, 64, 64, [(900, 200), (300, 1)], seed=1)
    with force_backend("kernel"):
        before = len(os.listdir("/proc/self/task"))
        attention(q, k, v, kv, AttentionBatch.build(seqs, 64), None)
        assert len(os.listdir("/proc/self/task")) == before


# ---- the switch and the fallback ---------------------------------------------------------------


def test_the_environment_variable_chooses_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUALPATH_ATTENTION", "gather")
    assert backend_for(torch.device("cpu")).name == "gather"
    monkeypatch.setenv("DUALPATH_ATTENTION", "paged")
    assert backend_for(torch.device("cpu")).name == "paged"
    with force_backend("gather"):
        assert backend_for(torch.device("cpu")).name == "gather"
    monkeypatch.setenv("DUALPATH_ATTENTION", "flash")
    with pytest.raises(ValueError, match="DUALPATH_ATTENTION"):
        backend_for(torch.device("cpu"))
    monkeypatch.setenv("DUALPATH_ATTENTION", "auto")
    assert backend_for(torch.device("meta")).name == "gather"  # no paged backend off the CPU yet


def test_a_failed_build_falls_back_to_torch_and_logs_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(kernel_module, "SOURCE", tmp_path / "missing.cpp")
    monkeypatch.setattr(attention_module, "_backends", {})
    kernel_op.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="dualpath_sdk.model.kernel"):
            with force_backend("auto"):
                assert backend_for(torch.device("cpu")).name == "paged"
                assert backend_for(torch.device("cpu")).name == "paged"
            with force_backend("kernel"), pytest.raises(RuntimeError, match="unavailable"):
                backend_for(torch.device("cpu"))
        records = [r for r in caplog.records if r.name == "dualpath_sdk.model.kernel"]
        assert len(records) == 1 and "missing.cpp" in records[0].getMessage()
    finally:
        kernel_op.cache_clear()  # the real kernel again for the tests after this one


@pytest.mark.slow
def test_concurrent_first_builds_share_one_cache_entry(tmp_path: Path) -> None:
    """Two processes building into an empty cache at once: both load a kernel, one build is kept."""
    code = (
        "import torch; from dualpath_sdk.model.kernel import kernel_op; "
        "op = kernel_op(); assert op is not None; print('ok')"
    )
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE) for _ in range(2)
    ]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and all(o.strip() == b"ok" for o in outs)
    builds = [d for d in (tmp_path / "dualpath").iterdir() if d.is_dir()]
    assert [d.name.startswith("paged_attention-") for d in builds] == [True]


# ---- whole models ------------------------------------------------------------------------------


def _chunked_logits(pair: Pair, prompt: list[int], chunks: list[int], table: list[int]) -> torch.Tensor:
    """Our logits for every prompt position, prefilled chunk by chunk over the cached earlier chunks."""
    model = pair.ours.transformer
    engine = EngineCore(pair.ours, EngineConfig(block_size=BLOCK, num_blocks=len(table)))
    logits, start = [], 0
    for n in chunks:
        batch = AttentionBatch.build([SeqSlice(start, n, table)], BLOCK)
        batch.cos, batch.sin = model.rope(batch.positions)
        hidden = model.embed(torch.tensor(prompt[start : start + n]))
        for layer in range(len(model.layers)):
            hidden = model.layer(layer, hidden, batch, engine.pool.layer(layer))
        logits.append(model.logits(hidden))
        start += n
    return torch.cat(logits)


def _assert_logits_close(pair: Pair, prompt: list[int], chunks: list[int]) -> None:
    with torch.no_grad():
        ref = pair.ref(torch.tensor([prompt])).logits[0]
    table = _scattered(-(-len(prompt) // BLOCK) + 3)
    ours = _chunked_logits(pair, prompt, chunks, table)
    rel = (ours - ref).abs().max() / ref.abs().max()
    assert rel < 1e-4, f"relative logit error {rel:.2e}"


def test_logits_match_transformers_over_cached_scattered_blocks(tiny: Pair, path: str) -> None:
    """Prefill from scratch, then chunks over the cached KV, then single decode-like tokens."""
    _assert_logits_close(tiny, _tokens(tiny, 150, seed=1), [61, 40, 47, 1, 1])


def test_greedy_output_is_identical_reused_or_recomputed(tiny: Pair, path: str) -> None:
    turn1 = _tokens(tiny, 100, seed=1)
    prompt = turn1 + _tokens(tiny, 40, seed=2)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    expected = hf_greedy(tiny, prompt, 24)

    def engine(**overrides: int) -> EngineCore:
        return EngineCore(tiny.ours, EngineConfig(block_size=BLOCK, num_blocks=96, **overrides))

    assert engine().generate([prompt], params)[0].output_ids == expected  # recomputed
    reuse = engine()
    reuse.generate([turn1], SamplingParams(max_tokens=4))
    reused = reuse.generate([prompt], params)[0]
    assert reused.cached_tokens == (100 // BLOCK) * BLOCK
    assert reused.output_ids == expected  # reused from the pool
    imported = engine()
    seq = imported.add(prompt, params, prefix=FullBlockPrefix(reuse.export_prefix(prompt)))
    while imported.has_work:
        imported.step()
    assert seq.num_cached == (len(prompt) // BLOCK) * BLOCK and seq.output_ids == expected  # Full Blocks in
    assert engine(max_batch_tokens=16).generate([prompt], params)[0].output_ids == expected  # chunked


def test_mixed_batches_of_prefill_chunks_and_decodes_equal_each_alone(tiny: Pair, path: str) -> None:
    """A small token budget keeps prefill chunks and decode steps in the same forwards."""
    prompts = [_tokens(tiny, n, seed=n) for n in (7, 33, 64, 90, 130)]
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    config = EngineConfig(block_size=BLOCK, num_blocks=128, max_batch_tokens=40)
    together = EngineCore(tiny.ours, config).generate(prompts, params)
    alone = [EngineCore(tiny.ours, config).generate([p], params)[0] for p in prompts]
    assert [c.output_ids for c in together] == [c.output_ids for c in alone]
    assert together[4].output_ids == hf_greedy(tiny, prompts[4], 20)


@pytest.mark.slow
def test_default_model_logits_match_transformers_on_both_paths(default_pair: Pair) -> None:
    prompt = _tokens(default_pair, 700, seed=4)
    for name in PATHS:
        with force_backend(name):
            _assert_logits_close(default_pair, prompt, [300, 250, 149, 1])
