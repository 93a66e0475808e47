"""ModelSpec: what our forward needs to know of a llama-family model, read from its HF config."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from dualpath_sdk.errors import InvalidInput

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2
    qk_norm: bool  # Qwen3
    sliding_window: tuple[int | None, ...]  # per layer; None = full attention
    eos_token_ids: tuple[int, ...]
    inv_freq: torch.Tensor  # RoPE inverse frequencies, [head_dim // 2]
    rope_scale: float  # the "attention factor" some RoPE variants apply to cos/sin

    @classmethod
    def from_hf_config(cls, config: PretrainedConfig) -> ModelSpec:
        model_type = config.model_type
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise InvalidInput(
                f"model type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if getattr(config, "hidden_act", "silu") != "silu":
            raise InvalidInput(f"activation {config.hidden_act!r} is not supported (silu only)")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        inv_freq, rope_scale = _rope(config, head_dim)
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        eos = config.eos_token_id
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        return cls(
            model_type=model_type,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps,
            max_position=config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=tuple(window if kind == "sliding_attention" else None for kind in layer_types)
            if model_type != "mistral"
            else (window,) * config.num_hidden_layers,
            eos_token_ids=eos_ids,
            inv_freq=inv_freq,
            rope_scale=rope_scale,
        )


def _rope(config: PretrainedConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """RoPE frequencies for the config's variant, using transformers' own definitions of each."""
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        # float32 arithmetic, as the reference computes it, so positions agree bit for bit
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        return inv_freq, 1.0
    if rope_type == "dynamic" or rope_type not in ROPE_INIT_FUNCTIONS:
        # dynamic NTK rescales with the live sequence length: the KV of a prefix would change with its suffix.
        raise InvalidInput(f"RoPE variant {rope_type!r} is not supported")
    inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv_freq.float(), float(scale)
