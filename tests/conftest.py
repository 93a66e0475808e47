"""Shared fixtures: tiny random HF models saved to disk (nothing is downloaded), and the default model."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    LlamaConfig,
    MistralConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)

from dualpath_sdk.model.loader import Model, default_model_dir, load_model

# One thread: CPU tests share 2 cores with other processes, where OpenMP threads spin and stall.
torch.set_num_threads(1)

_COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=2048,
    initializer_range=0.2,  # peaked logits: greedy ties between implementations are not a coin flip
    tie_word_embeddings=False,
)

TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON),
    "llama3-rope": lambda: LlamaConfig(
        **_COMMON,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "qwen2": lambda: Qwen2Config(**_COMMON),
    "qwen3": lambda: Qwen3Config(**_COMMON),
    "mistral-window": lambda: MistralConfig(**_COMMON, sliding_window=48),
}


@dataclass
class Pair:
    """Our Model and the HF reference model on the same weights."""

    ours: Model
    ref: PreTrainedModel
    path: Path


def _pair(path: Path, config_factory, tokenizer=None) -> Pair:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(config_factory(), attn_implementation="sdpa").eval()
    ref.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return Pair(load_model(path), ref, path)


def hf_greedy(pair: Pair, prompt: list[int], n: int = 32) -> list[int]:
    """The reference: greedy decoding with transformers' own forward and KV cache, end-of-sequence ignored."""
    out: list[int] = []
    ids, cache = torch.tensor([prompt]), DynamicCache(config=pair.ref.config)
    with torch.no_grad():
        for _ in range(n):
            logits = pair.ref(ids, cache=cache, use_cache=True).logits
            out.append(int(logits[0, -1].argmax()))
            ids = torch.tensor([[out[-1]]])
    return out


@pytest.fixture(scope="session", params=sorted(TINY_CONFIGS))
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Pair:
    return _pair(tmp_path_factory.mktemp(request.param), TINY_CONFIGS[request.param])


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    return _pair(tmp_path_factory.mktemp("llama"), TINY_CONFIGS["llama"])


@pytest.fixture(scope="session")
def chat_pair(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    """A tiny random Llama with the default model's tokenizer and chat template (so chat turns run)."""
    path = tmp_path_factory.mktemp("tiny-chat")
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    config = LlamaConfig(**{**_COMMON, "vocab_size": len(tokenizer)}, eos_token_id=tokenizer.eos_token_id)
    return _pair(path, lambda: config, tokenizer)


@pytest.fixture(scope="session")
def default_pair() -> Pair:
    ours = load_model(weights="fp32")  # converts the packaged GGUF once; fp32: transformers' weights
    ref = AutoModelForCausalLM.from_pretrained(ours.path, dtype=torch.float32).eval()
    return Pair(ours, ref, ours.path)


@contextmanager
def mounted_tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` at `mount`: a file system that really fills up (or is remounted read-only);
    skips the test where mounting is not allowed (it needs root)."""
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=700", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.hookimpl(tryfirst=True)  # before `-m 'not slow'` deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test class's `slow_except` (test names): its other tests, inherited ones included, are
    marked slow. For LangChain's standard suites, whose tests cannot be overridden to mark them."""
    for item in items:
        cls = getattr(item, "cls", None)
        keep = getattr(cls, "slow_except", None) if cls is not None else None
        if keep is not None and getattr(item, "originalname", item.name) not in keep:
            item.add_marker(pytest.mark.slow)
