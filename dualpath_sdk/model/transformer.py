"""Our llama-family forward, written layer by layer over a paged KV pool.

`embed -> layer(0) ... layer(L-1) -> logits`. Each `layer` call is independent: it gets the
hidden states, the batch's attention metadata and that layer's KV tensor
`[num_blocks, block_size, 2, kv_heads, head_dim]`, writes the new tokens' K/V into it and
attends over the cached + new KV. Layer-wise prefill (load layer k+1 while layer k runs) is
built on exactly this seam.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from dualpath_sdk.model.attention import AttentionBatch, attention
from dualpath_sdk.model.spec import ModelSpec


class _Layer:
    """One decoder layer's weights. Projections stay separate: fusing q/k/v or gate/up into one
    matmul measured slower with CPU BLAS here (odd shapes, strided halves), see bench engine."""

    def __init__(self, spec: ModelSpec, w: Mapping[str, torch.Tensor], prefix: str) -> None:
        attn = f"{prefix}.self_attn"
        self.input_norm = w[f"{prefix}.input_layernorm.weight"]
        self.post_norm = w[f"{prefix}.post_attention_layernorm.weight"]
        self.q, self.k, self.v = (w[f"{attn}.{p}_proj.weight"] for p in "qkv")
        bias: dict[str, torch.Tensor | None] = {
            p: w[f"{attn}.{p}_proj.bias"] if spec.qkv_bias else None for p in "qkv"
        }
        self.q_bias, self.k_bias, self.v_bias = bias["q"], bias["k"], bias["v"]
        self.q_norm = w[f"{attn}.q_norm.weight"] if spec.qk_norm else None
        self.k_norm = w[f"{attn}.k_norm.weight"] if spec.qk_norm else None
        self.o_proj = w[f"{attn}.o_proj.weight"]
        mlp = f"{prefix}.mlp"
        self.gate = w[f"{mlp}.gate_proj.weight"]
        self.up = w[f"{mlp}.up_proj.weight"]
        self.down = w[f"{mlp}.down_proj.weight"]


class Transformer:
    """Weights plus the forward; holds no KV and no per-request state."""

    def __init__(self, spec: ModelSpec, weights: Mapping[str, torch.Tensor]) -> None:
        self.spec = spec
        self.dtype = weights["model.embed_tokens.weight"].dtype
        self.embed_tokens = weights["model.embed_tokens.weight"]
        self.layers = [_Layer(spec, weights, f"model.layers.{i}") for i in range(spec.num_layers)]
        self.norm = weights["model.norm.weight"]
        self.lm_head = self.embed_tokens if spec.tie_word_embeddings else weights["lm_head.weight"]
        self._q_size = spec.num_heads * spec.head_dim

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """`[T]` token ids -> `[T, hidden]`."""
        return F.embedding(token_ids, self.embed_tokens)

    def layer(
        self, index: int, hidden: torch.Tensor, batch: AttentionBatch, kv: torch.Tensor
    ) -> torch.Tensor:
        """Run decoder layer `index` on `[T, hidden]`, writing the new K/V into `kv` (that layer's KV)."""
        spec, w = self.spec, self.layers[index]
        x = _rms_norm(hidden, w.input_norm, spec.rms_norm_eps)
        q = F.linear(x, w.q, w.q_bias).view(-1, spec.num_heads, spec.head_dim)
        k = F.linear(x, w.k, w.k_bias).view(-1, spec.num_kv_heads, spec.head_dim)
        v = F.linear(x, w.v, w.v_bias).view(-1, spec.num_kv_heads, spec.head_dim)
        if w.q_norm is not None and w.k_norm is not None:
            q = _rms_norm(q, w.q_norm, spec.rms_norm_eps)
            k = _rms_norm(k, w.k_norm, spec.rms_norm_eps)
        q, k = _rotate(q, batch.cos, batch.sin), _rotate(k, batch.cos, batch.sin)
        out = attention(q, k, v, kv, batch, spec.sliding_window[index])
        hidden = hidden + F.linear(out.reshape(-1, self._q_size), w.o_proj)
        x = _rms_norm(hidden, w.post_norm, spec.rms_norm_eps)
        return hidden + F.linear(F.silu(F.linear(x, w.gate)) * F.linear(x, w.up), w.down)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[N, hidden]` -> `[N, vocab]` in fp32 (sampling wants fp32 whatever the KV dtype)."""
        return F.linear(_rms_norm(hidden, self.norm, self.spec.rms_norm_eps), self.lm_head).float()

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for `[T]` positions, `[T, 1, head_dim]`, computed once per forward for all layers."""
        freqs = positions[:, None].float() * self.spec.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]
        scale = self.spec.rope_scale
        return (emb.cos() * scale).to(self.dtype), (emb.sin() * scale).to(self.dtype)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
