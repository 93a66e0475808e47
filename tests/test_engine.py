"""Engine behaviour beyond exactness: sampling, stops, batching limits, bad input."""

from __future__ import annotations

import pytest
import torch

from dualpath_sdk.config import EngineConfig
from dualpath_sdk.engine.core import EngineCore
from dualpath_sdk.engine.sequence import FullBlockPrefix, SamplingParams
from dualpath_sdk.errors import ContextTooLong, InvalidInput
from dualpath_sdk.model.loader import load_model
from tests.conftest import Pair

PROMPT = list(range(10, 90))


def _engine(pair: Pair, **overrides: int) -> EngineCore:
    return EngineCore(pair.ours, EngineConfig(**{"block_size": 16, "num_blocks": 64, **overrides}))


def _run(engine: EngineCore, params: SamplingParams) -> list[int]:
    return engine.generate([PROMPT], params)[0].output_ids


def test_seeded_sampling_is_reproducible_and_seed_dependent(tiny_llama: Pair) -> None:
    params = SamplingParams(max_tokens=16, temperature=1.5, seed=7, ignore_eos=True)
    first = _run(_engine(tiny_llama), params)
    assert _run(_engine(tiny_llama), params) == first
    other = _run(_engine(tiny_llama), SamplingParams(max_tokens=16, temperature=1.5, seed=8, ignore_eos=True))
    assert other != first


def test_tiny_top_p_is_greedy(tiny_llama: Pair) -> None:
    greedy = _run(_engine(tiny_llama), SamplingParams(max_tokens=12, ignore_eos=True))
    nucleus = SamplingParams(max_tokens=12, temperature=1.0, top_p=1e-6, seed=3, ignore_eos=True)
    assert _run(_engine(tiny_llama), nucleus) == greedy


def test_stop_token_and_max_tokens_end_a_sequence(tiny_llama: Pair) -> None:
    greedy = _run(_engine(tiny_llama), SamplingParams(max_tokens=12, ignore_eos=True))
    stop_at = greedy[4]
    first_hit = greedy.index(stop_at)
    done = _engine(tiny_llama).generate([PROMPT], SamplingParams(max_tokens=12, stop_token_ids=(stop_at,)))[0]
    assert done.finish_reason == "stop"
    assert done.output_ids == greedy[: first_hit + 1]
    limited = _engine(tiny_llama).generate([PROMPT], SamplingParams(max_tokens=3, ignore_eos=True))[0]
    assert (limited.finish_reason, len(limited.output_ids)) == ("length", 3)


def test_sequences_join_and_leave_the_running_batch(tiny_llama: Pair) -> None:
    engine = _engine(tiny_llama)
    short = engine.add(PROMPT, SamplingParams(max_tokens=4, ignore_eos=True))
    long = engine.add(PROMPT[:40], SamplingParams(max_tokens=8, ignore_eos=True))
    engine.step()
    late = engine.add(PROMPT[:20], SamplingParams(max_tokens=3, ignore_eos=True))
    sizes = []
    while engine.has_work:
        engine.step()
        sizes.append(len(engine.running))
    assert sizes[0] == 3  # the late request joined the two running ones
    assert sizes[-2:] == [1, 0]  # the short ones left first, the long one decoded alone
    assert short.finish_reason == late.finish_reason == long.finish_reason == "length"
    assert engine.pool.num_free == engine.pool.num_blocks  # every block came back


def test_waiting_requests_wait_for_blocks_instead_of_failing(tiny_llama: Pair) -> None:
    engine = _engine(tiny_llama, num_blocks=8)  # room for one 80+40 token request at a time
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    seqs = [engine.add(PROMPT, params) for _ in range(2)]
    engine.step()
    assert len(engine.running) == 1 and len(engine.waiting) == 1
    while engine.has_work:
        engine.step()
    assert seqs[0].output_ids == seqs[1].output_ids


def test_max_running_caps_the_batch(tiny_llama: Pair) -> None:
    engine = _engine(tiny_llama, max_running=2)
    for _ in range(3):
        engine.add(PROMPT[:8], SamplingParams(max_tokens=2, ignore_eos=True))
    engine.step()
    assert len(engine.running) == 2


@pytest.mark.parametrize(
    ("prompt", "params", "error"),
    [
        ([], SamplingParams(), InvalidInput),
        ([1, 2, 512], SamplingParams(), InvalidInput),
        ([-1], SamplingParams(), InvalidInput),
        (list(range(100)) * 20, SamplingParams(max_tokens=100), ContextTooLong),
        (PROMPT, SamplingParams(max_tokens=2000), ContextTooLong),
    ],
)
def test_bad_requests_raise_typed_errors_and_queue_nothing(
    tiny_llama: Pair, prompt: list[int], params: SamplingParams, error: type[Exception]
) -> None:
    engine = _engine(tiny_llama)
    with pytest.raises(error):
        engine.add(prompt, params)
    assert not engine.has_work


def test_a_prefix_covering_the_whole_prompt_is_refused(tiny_llama: Pair) -> None:
    engine = _engine(tiny_llama)
    engine.generate([PROMPT], SamplingParams(max_tokens=1))
    blocks = engine.export_prefix(PROMPT)
    with pytest.raises(InvalidInput, match="at least one prompt token"):
        engine.add(PROMPT[:64], prefix=FullBlockPrefix(blocks))


@pytest.mark.parametrize("kwargs", [{"max_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_bad_sampling_params_are_invalid_input(kwargs: dict[str, float]) -> None:
    with pytest.raises(InvalidInput):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_loading_something_that_is_not_a_model_is_invalid_input(tmp_path: pytest.TempPathFactory) -> None:
    with pytest.raises(InvalidInput, match="neither an HF model directory"):
        load_model(tmp_path)


def test_unsupported_architecture_is_invalid_input(tmp_path: pytest.TempPathFactory) -> None:
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(InvalidInput, match="not supported"):
        load_model(tmp_path)


def test_layer_calls_are_independent_of_the_batch_around_them(tiny_llama: Pair) -> None:
    """One layer run on its own gives the same hidden states as inside a full forward."""
    from dualpath_sdk.model.attention import AttentionBatch, SeqSlice

    model = tiny_llama.ours.transformer
    engine = _engine(tiny_llama)
    batch = AttentionBatch.build([SeqSlice(0, 20, [0, 1])], 16)
    batch.cos, batch.sin = model.rope(batch.positions)
    hidden = model.embed(torch.tensor(PROMPT[:20]))
    after0 = model.layer(0, hidden, batch, engine.pool.layer(0))
    after1 = model.layer(1, after0, batch, engine.pool.layer(1))
    again = model.layer(1, after0.clone(), batch, engine.pool.layer(1).clone())
    assert torch.equal(after1, again)
