"""Weight precisions (model/quant.py): each quantized form against fp32, and exactness within our own
engine (reuse equals recompute) in every precision."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dualpath_sdk.api.cluster import Cluster
from dualpath_sdk.bench.engine import AGREEMENT_PROMPTS as CHATS
from dualpath_sdk.config import ClusterConfig, EngineConfig, KVDtype, StoreConfig, WeightPrecision
from dualpath_sdk.engine.core import KV_DTYPES, EngineCore, kv_layout
from dualpath_sdk.engine.sequence import FullBlockPrefix, SamplingParams
from dualpath_sdk.kv.block import FullBlock
from dualpath_sdk.kv.keys import block_keys
from dualpath_sdk.model import quant
from dualpath_sdk.model.attention import AttentionBatch, SeqSlice
from dualpath_sdk.model.chat import encode_chat
from dualpath_sdk.model.loader import Model, default_model_dir, load_model
from tests.conftest import TINY_CONFIGS, Pair

PRECISIONS: list[WeightPrecision] = ["fp32", "int8", "int4"]
QUANTIZED: list[WeightPrecision] = ["int8", "int4"]
KV_16: list[KVDtype] = ["bf16", "fp16"]
BLOCK = 16
GREEDY_24 = SamplingParams(max_tokens=24, ignore_eos=True)


def _prompt(vocab: int, n: int, seed: int = 1) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _logits(model: Model, tokens: list[int], prefill: int) -> torch.Tensor:
    """fp32 logits at every position: the first `prefill` tokens in one forward (the many-row path),
    then one token per forward over the cached KV (the decode path)."""
    config = EngineConfig(block_size=BLOCK, num_blocks=-(-len(tokens) // BLOCK), kv_dtype="fp32")
    engine = EngineCore(model, config)
    transformer, table = model.transformer, list(range(engine.pool.num_blocks))
    out, start = [], 0
    for n in [prefill] + [1] * (len(tokens) - prefill):
        batch = AttentionBatch.build([SeqSlice(start, n, table)], BLOCK)
        batch.cos, batch.sin = transformer.rope(batch.positions)
        hidden = transformer.embed(torch.tensor(tokens[start : start + n]))
        for layer in range(len(transformer.layers)):
            hidden = transformer.layer(layer, hidden, batch, engine.pool.layer(layer))
        out.append(transformer.logits(hidden))
        start += n
    return torch.cat(out)


def _on_grid(path: Path, arch: str, precision: WeightPrecision) -> Path:
    """A tiny model whose projections the precision holds exactly (as the default model's Q4_1 ones
    are for int4): each snapped to its quantized values. What remains is the kernels' own error."""
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(TINY_CONFIGS[arch](), attn_implementation="sdpa").eval()
    kind = {"int8": quant.Int8Linear, "int4": quant.Int4Linear}[precision]
    state = ref.state_dict()
    with torch.no_grad():
        for name, weight in state.items():
            if name.endswith("_proj.weight"):
                weight.copy_(kind(weight, None).weight())
    ref.save_pretrained(path)
    return path


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: biases on q/k/v
@pytest.mark.parametrize("precision", QUANTIZED)
def test_logits_match_fp32_where_the_precision_holds_the_weights_exactly(
    tmp_path: Path, arch: str, precision: WeightPrecision
) -> None:
    path = _on_grid(tmp_path, arch, precision)
    tokens = _prompt(512, 64)
    ref = _logits(load_model(path), tokens, prefill=48)
    for prefill in (48, 2):  # the many-row path; then the packed kernels over nearly every position
        ours = _logits(load_model(path, weights=precision), tokens, prefill)
        rel = (ours - ref).abs().amax(-1) / ref.abs().amax(-1)
        # bf16 activations in peaked random models: measured median 0.015-0.024, max 0.07, agreement
        # 0.92-1.0; off the grid, int4's median error is ~1 (and a misplaced weight's, too)
        assert rel.median() < 0.04 and rel.max() < 0.1, (
            f"relative logit errors {rel.median():.3f} {rel.max():.3f}"
        )
        assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("kernel", ["csrc", "torch"])
@pytest.mark.parametrize("precision", QUANTIZED)
def test_every_row_is_bitwise_the_same_in_any_batch(
    tiny_llama: Pair, precision: WeightPrecision, kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token's KV must not depend on the forward that computed it (decode, a chunk, a long prefill),
    so each projection's row is the same bits at every row count, on csrc's kernels and on torch's
    (the fallback); and it multiplies by `weight()`, the weights the tests snap models to."""
    if kernel == "torch":
        monkeypatch.setattr(quant, "_ops", lambda: None)
    else:
        assert quant._ops() is not None, "csrc/quant_linear.cpp did not build (see the log)"
    layer = load_model(tiny_llama.path, weights=precision).transformer.layers[1]
    g = torch.Generator().manual_seed(0)
    for proj, k in ((layer.qkv, 64), (layer.o_proj, 64), (layer.gate_up, 64), (layer.down, 128)):
        assert isinstance(proj, quant.Int8Linear | quant.Int4Linear)
        x = torch.randn(300, k, generator=g).to(proj.dtype)
        alone = torch.cat([proj(x[i : i + 1]) for i in range(len(x))])
        for rows in (2, 5, 7, 64, 65, 300):
            assert torch.equal(proj(x[:rows]), alone[:rows]), f"{rows} rows"
        ref = x.double() @ proj.weight().double().t()
        assert ((alone.double() - ref).abs().max() / ref.abs().max()) < 1e-2  # bf16 activations: ~4e-3


@pytest.mark.parametrize("precision", QUANTIZED)
def test_fused_layer_ops_equal_the_torch_ops_they_replace(
    tiny_llama: Pair, precision: WeightPrecision
) -> None:
    """csrc's linears take the layer norm before them, SwiGLU of the gate/up output, and the residual
    after: each fused call equals the plain call with torch's ops around it (to float rounding), and
    stays bitwise row-independent, as the plain calls are."""
    assert quant._ops() is not None, "csrc/quant_linear.cpp did not build (see the log)"
    layer = load_model(tiny_llama.path, weights=precision).transformer.layers[1]
    g = torch.Generator().manual_seed(0)
    x, norm = torch.randn(300, 64, generator=g), torch.rand(64, generator=g) + 0.5
    gate_up = torch.randn(300, 256, generator=g)  # [gate | up] of the 128-wide MLP
    residual = torch.randn(300, 64, generator=g)
    # (projection, input, its fused keywords as a function of the rows taken, the torch ops' result)
    cases: list[tuple[quant.Projection, torch.Tensor, Callable[[slice], dict[str, Any]], torch.Tensor]] = [
        (layer.qkv, x, lambda _: {"norm": norm, "eps": 1e-5}, layer.qkv(F.rms_norm(x, (64,), norm, 1e-5))),
        (layer.o_proj, x, lambda rows: {"residual": residual[rows]}, residual + layer.o_proj(x)),
        (
            layer.down,
            gate_up,
            lambda rows: {"gate": True, "residual": residual[rows]},
            residual + layer.down(F.silu(gate_up[:, :128]) * gate_up[:, 128:]),
        ),
    ]
    for proj, inputs, fused, expected in cases:
        torch.testing.assert_close(proj(inputs, **fused(slice(None))), expected, rtol=1e-4, atol=1e-4)
        alone = torch.cat([proj(inputs[i : i + 1], **fused(slice(i, i + 1))) for i in range(len(inputs))])
        for rows in (2, 4, 5, 64, 300):
            assert torch.equal(proj(inputs[:rows], **fused(slice(rows))), alone[:rows]), f"{rows} rows"


@pytest.mark.parametrize("kv_dtype", ["fp32", *KV_16])
def test_rope_store_equals_torch_rope_and_store(tiny_llama: Pair, kv_dtype: KVDtype) -> None:
    """csrc's `rope_store` (quantized layers) rotates q and k and writes k and v into the pool at the
    batch's slots in one pass: what `_rotate` and attention's store do in torch ops, to rounding."""
    ops = quant._ops()
    assert ops is not None, "csrc/quant_linear.cpp did not build (see the log)"
    from dualpath_sdk.model.transformer import _rotate

    model = load_model(tiny_llama.path)
    spec, transformer = model.spec, model.transformer
    heads, kv_heads = spec.num_heads, spec.num_kv_heads
    engine = EngineCore(model, EngineConfig(block_size=BLOCK, num_blocks=8, kv_dtype=kv_dtype))
    batch = AttentionBatch.build([SeqSlice(5, 20, [3, 1, 6]), SeqSlice(0, 1, [2])], BLOCK)
    batch.cos, batch.sin = transformer.rope(batch.positions)
    qkv = torch.randn(21, heads + 2 * kv_heads, spec.head_dim, generator=torch.Generator().manual_seed(2))
    kv = engine.pool.layer(0)
    q = ops.rope_store(qkv, batch.cos, batch.sin, kv, batch.slot_mapping, heads)
    qk = _rotate(qkv[:, : heads + kv_heads], batch.cos, batch.sin)
    torch.testing.assert_close(q, qk[:, :heads], rtol=1e-6, atol=1e-6)
    slots = kv.view(-1, *kv.shape[2:])[batch.slot_mapping]  # [T, 2, kv_heads, D]
    expected = torch.stack([qk[:, heads:], qkv[:, heads + kv_heads :]], dim=1).to(kv.dtype)
    torch.testing.assert_close(slots, expected, rtol=1e-2 if kv_dtype != "fp32" else 1e-6, atol=1e-6)
    written = torch.zeros(kv.shape[:2], dtype=torch.bool).view(-1)
    written[batch.slot_mapping] = True
    assert not kv.view(-1, *kv.shape[2:])[~written].any()  # nothing outside the slots


def test_auto_picks_int4_and_fp16_kv_only_for_a_4_bit_checkpoint(tiny_llama: Pair, tmp_path: Path) -> None:
    """EngineConfig's defaults ("auto"): an fp32 checkpoint keeps fp32 weights and KV (exact against
    transformers); one whose projections lie on a 4-bit grid, as the default model's Q4_1 ones do, gets
    int4 weights and fp16 KV; an explicit choice stands."""
    assert quant._ops() is not None, "csrc/quant_linear.cpp did not build (see the log)"
    assert EngineConfig().weights == "auto" and EngineConfig().kv_dtype == "auto"
    fp32 = load_model(tiny_llama.path)
    assert fp32.weights == "fp32" and fp32.fingerprint == tiny_llama.ours.fingerprint
    assert EngineCore(fp32).layout.dtype == torch.float32
    grid = _on_grid(tmp_path, "llama", "int4")
    auto = load_model(grid)
    assert auto.weights == "int4" and auto.fingerprint == load_model(grid, weights="int4").fingerprint
    assert EngineCore(auto).layout.dtype == torch.float16
    assert EngineCore(auto, EngineConfig(kv_dtype="fp32")).layout.dtype == torch.float32
    assert load_model(grid, weights="fp32").weights == "fp32"
    state = load_file(default_model_dir() / "model.safetensors")
    assert quant.on_int4_grid(state)  # the default model: Q4_1
    nudged = state["model.layers.3.mlp.down_proj.weight"] = state[
        "model.layers.3.mlp.down_proj.weight"
    ].clone()
    nudged[5, 7] += 1e-3 * (nudged[5, :32].amax() - nudged[5, :32].amin())  # one weight off its level
    assert not quant.on_int4_grid(state)


def test_fingerprints_differ_per_precision(tiny_llama: Pair) -> None:
    """KV computed under one precision's weights is never found under another's."""
    models = {p: load_model(tiny_llama.path, weights=p) for p in PRECISIONS}
    assert models["fp32"].fingerprint == tiny_llama.ours.fingerprint  # fp32's KV keeps its keys
    assert len({m.fingerprint for m in models.values()}) == len(PRECISIONS)
    assert len({EngineCore(m).root_key() for m in models.values()}) == len(PRECISIONS)
    prompt = _prompt(512, 40)
    engine = EngineCore(models["int4"], EngineConfig(block_size=BLOCK, num_blocks=16))
    engine.generate([prompt], SamplingParams(max_tokens=2))
    assert len(engine.export_prefix(prompt)) == 2  # the int4 engine finds its own blocks
    for other in ("fp32", "int8"):  # and an engine of another precision, looking in that pool, none
        keys = block_keys(EngineCore(models[other]).root_key(), prompt, BLOCK)
        assert engine.pool.match_prefix(keys) == []


@pytest.mark.parametrize("precision", QUANTIZED)
def test_reuse_equals_recompute_in_every_precision(tiny: Pair, precision: WeightPrecision) -> None:
    """As tests/test_exactness.py does for fp32 (there against transformers): every way the prefix KV
    gets there gives the same tokens, including a reuse that leaves the packed path a prefill of <= 8."""
    model = load_model(tiny.path, weights=precision)

    def engine(**overrides: int) -> EngineCore:
        return EngineCore(model, EngineConfig(block_size=BLOCK, num_blocks=128, kv_dtype="fp32", **overrides))

    turn1 = _prompt(512, 100, seed=1)
    prompt = turn1 + _prompt(512, 40, seed=2)
    expected = engine().generate([prompt], GREEDY_24)[0].output_ids

    cached = engine()
    cached.generate([turn1], SamplingParams(max_tokens=4))
    reused = cached.generate([prompt], GREEDY_24)[0]
    assert reused.cached_tokens == (100 // BLOCK) * BLOCK
    assert reused.output_ids == expected

    blocks = [FullBlock(cached.layout, bytearray(bytes(b.raw.numpy()))) for b in cached.export_prefix(prompt)]
    fresh = engine()
    seq = fresh.add(prompt, GREEDY_24, prefix=FullBlockPrefix(blocks))
    while fresh.has_work:
        fresh.step()
    assert seq.num_cached == len(blocks) * BLOCK
    assert seq.output_ids == expected

    assert engine(max_batch_tokens=16).generate([prompt], GREEDY_24)[0].output_ids == expected

    short = turn1[:96] + _prompt(512, 8, seed=3)  # 96 cached, 8 new: a prefill through the packed kernels
    alone = engine().generate([short], GREEDY_24)[0].output_ids
    again = cached.generate([short], GREEDY_24)[0]
    assert again.cached_tokens == 96
    assert again.output_ids == alone


@pytest.mark.parametrize("kv_dtype", KV_16)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_16_bit_kv_reuse_equals_recompute(
    tiny_llama: Pair, precision: WeightPrecision, kv_dtype: KVDtype
) -> None:
    """KV in bf16 / fp16 in every tier: half the bytes per Full Block, and every way the prefix KV gets
    there (the pool, exported Full Block bytes, chunked prefill) gives the same tokens."""
    model = load_model(tiny_llama.path, weights=precision)

    def engine(**overrides: int) -> EngineCore:
        return EngineCore(
            model, EngineConfig(block_size=BLOCK, num_blocks=64, kv_dtype=kv_dtype, **overrides)
        )

    turn1 = _prompt(512, 100, seed=1)
    prompt = turn1 + _prompt(512, 40, seed=2)
    recomputed = engine()
    expected = recomputed.generate([prompt], GREEDY_24)[0].output_ids
    assert recomputed.pool.kv.dtype == KV_DTYPES[kv_dtype]
    assert recomputed.layout.bytes_per_token * 2 == kv_layout(model, BLOCK).bytes_per_token
    cached = engine()
    cached.generate([turn1], SamplingParams(max_tokens=4))
    assert cached.generate([prompt], GREEDY_24)[0].output_ids == expected
    wire = [bytes(b.raw.numpy()) for b in cached.export_prefix(prompt)]
    assert {len(raw) for raw in wire} == {cached.layout.full_block_nbytes}
    fresh = engine()
    blocks = [FullBlock(fresh.layout, bytearray(raw)) for raw in wire]
    seq = fresh.add(prompt, GREEDY_24, prefix=FullBlockPrefix(blocks))
    while fresh.has_work:
        fresh.step()
    assert seq.num_cached == len(blocks) * BLOCK and seq.output_ids == expected
    assert engine(max_batch_tokens=16).generate([prompt], GREEDY_24)[0].output_ids == expected


def test_keys_of_different_kv_dtypes_never_mix(tiny_llama: Pair) -> None:
    """The KV dtype is in the block namespace: an engine never finds blocks of another KV dtype."""
    engines = {
        kv: EngineCore(tiny_llama.ours, EngineConfig(block_size=BLOCK, num_blocks=16, kv_dtype=kv))
        for kv in ("fp32", *KV_16)
    }
    assert len({e.root_key() for e in engines.values()}) == 3
    prompt = _prompt(512, 40)
    for kv, engine in engines.items():
        engine.generate([prompt], SamplingParams(max_tokens=2))
        assert len(engine.export_prefix(prompt)) == 2
        for other in engines.values():
            if other is not engine:
                assert engine.pool.match_prefix(block_keys(other.root_key(), prompt, BLOCK)) == [], kv


@pytest.mark.parametrize("precision", PRECISIONS)
def test_batched_decode_equals_each_sequence_alone(tiny_llama: Pair, precision: WeightPrecision) -> None:
    """4 and 64 sequences decoding at once (EngineConfig.max_running): the packed kernels' rows are
    bitwise independent of the batch, so only attention's sums could differ."""
    model = load_model(tiny_llama.path, weights=precision)
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    for count in (4, 64):
        prompts = [_prompt(512, 7 + 3 * i, seed=i) for i in range(count)]
        config = EngineConfig(block_size=BLOCK, num_blocks=1024, max_running=count, kv_dtype="fp32")
        together = EngineCore(model, config).generate(prompts, params)
        for prompt, got in zip(prompts, together, strict=True):
            alone = EngineCore(
                model, EngineConfig(block_size=BLOCK, num_blocks=32, kv_dtype="fp32")
            ).generate([prompt], params)
            assert got.output_ids == alone[0].output_ids


@pytest.fixture(scope="module")
def default_quantized() -> dict[WeightPrecision, Model]:
    """The default model in each quantized form, loaded once for the tests below."""
    return {precision: load_model(weights=precision) for precision in QUANTIZED}


def test_default_model_agrees_with_fp32(
    default_pair: Pair, default_quantized: dict[WeightPrecision, Model]
) -> None:
    """Teacher-forced over fp32's own greedy continuation of a chat turn: the share of positions
    where each form's argmax is fp32's, on both paths (measured: int4 0.99, int8 0.97)."""
    fp32 = default_pair.ours
    assert fp32.tokenizer is not None
    prompt = encode_chat(fp32.tokenizer, [{"role": "user", "content": "List three uses of a hash map."}])
    engine = EngineCore(fp32, EngineConfig(block_size=BLOCK, num_blocks=16))
    tokens = prompt + engine.generate([prompt], SamplingParams(max_tokens=48))[0].output_ids
    ref = _logits(fp32, tokens, prefill=len(tokens) - 24)[len(prompt) - 1 :]
    for precision, bound in (("int8", 0.9), ("int4", 0.95)):
        model = default_quantized[precision]
        for prefill in (len(tokens), len(tokens) - 24):
            ours = _logits(model, tokens, prefill)[len(prompt) - 1 :]
            agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean()
            assert agree >= bound, f"{precision}: {agree:.3f} of positions agree with fp32"


@pytest.mark.parametrize(
    "precision,kv_dtype", [("int8", "fp32"), ("int4", "fp32"), ("fp32", "bf16"), ("int4", "fp16")]
)
def test_reuse_equals_recompute_over_every_read_plan(
    tiny_llama: Pair, precision: WeightPrecision, kv_dtype: KVDtype, tmp_path: Path
) -> None:
    """Real PE and DE processes in a quantized form or with 16-bit KV (store, buffers, transfers): over
    the PE read, the DE read and the split, each turn's tokens equal the single-process engine's from
    scratch (its KV all recomputed), and the bytes read are the KV dtype's."""
    config = EngineConfig(block_size=BLOCK, num_blocks=256, weights=precision, kv_dtype=kv_dtype)
    cluster_config = ClusterConfig(
        model=str(tiny_llama.path), engine=config, store=StoreConfig(root=tmp_path), buffer_slots=64
    )
    model = load_model(tiny_llama.path, weights=precision)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    with Cluster(cluster_config) as cluster:
        for base, plan in ((100, "pe"), (200, "de"), (300, "split")):
            session = cluster.session()
            for turn in range(3):
                prompt = session.token_ids + _prompt(512, 37, seed=base + turn)
                new = prompt[len(session.token_ids) :]
                result = session.step_tokens(new, max_tokens=12, ignore_eos=True, read_plan=plan)
                alone = EngineCore(model, EngineConfig(block_size=BLOCK, num_blocks=64, kv_dtype=kv_dtype))
                assert result.token_ids == alone.generate([prompt], params)[0].output_ids, (
                    f"{plan}, turn {turn}"
                )
                assert result.load.plan == ("none" if turn == 0 else plan)
                read = result.load.bytes_pe + result.load.bytes_de
                assert read == result.usage.cached_tokens * alone.layout.bytes_per_token


def test_default_model_reuse_equals_recompute_in_chats(
    default_quantized: dict[WeightPrecision, Model],
) -> None:
    """The case that diverged when prefill took another GEMM than decode (1-2 of 8 chats): two-turn chats
    on the default model, the second turn reusing the first's KV, generated tokens included. The 8 chats
    run as one batch: a row's bits do not depend on its batch (test_batched_decode_equals_each_sequence_alone
    shows it)."""
    for precision, model in default_quantized.items():
        assert model.tokenizer is not None
        config = EngineConfig(block_size=BLOCK, num_blocks=512, kv_dtype="fp32")
        engine = EngineCore(model, config)
        params = SamplingParams(max_tokens=48)
        follow = model.tokenizer.encode(
            "<|im_end|>\n<|im_start|>user\nSay more.<|im_end|>\n<|im_start|>assistant\n",
            add_special_tokens=False,
        )
        turn1 = [encode_chat(model.tokenizer, [{"role": "user", "content": text}]) for text in CHATS]
        replies = engine.generate(turn1, params)
        prompts = [first + reply.output_ids + follow for first, reply in zip(turn1, replies, strict=True)]
        reused = engine.generate(prompts, params)
        fresh = EngineCore(model, config).generate(prompts, params)
        for text, first, again, alone in zip(CHATS, turn1, reused, fresh, strict=True):
            assert again.cached_tokens >= len(first) // BLOCK * BLOCK
            assert again.output_ids == alone.output_ids, f"{precision}: {text}"
