"""Our llama-family forward, written layer by layer over a paged KV pool.

`embed -> layer(0) ... layer(L-1) -> logits`. Each `layer` call is independent: it gets the
hidden states, the batch's attention metadata and that layer's KV tensor
`[num_blocks, block_size, 2, kv_heads, head_dim]`, writes the new tokens' K/V into it and
attends over the cached + new KV. Layer-wise prefill (load layer k+1 while layer k runs) is
built on exactly this seam.

A decode step runs ~20 small ops per layer besides its linears and attention; each costs microseconds
of dispatch whatever its size, so the layer keeps their count down: q/k/v and gate/up are one
projection each, q and k take RoPE in one pass, and each projection takes the norm before it and the
residual after (model/quant.py's Projection). On csrc's quantized kernels those are fused into the
linears' calls and RoPE with the K/V store into one (`rope_store`): five calls and the attention per
layer. fp32 keeps torch's ops, whose bits are the reference against transformers.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from dualpath_sdk.config import WeightPrecision
from dualpath_sdk.model import quant
from dualpath_sdk.model.attention import AttentionBatch, attention
from dualpath_sdk.model.spec import ModelSpec


class _Layer:
    """One decoder layer's weights in the model's precision (model/quant.py)."""

    def __init__(
        self, spec: ModelSpec, w: Mapping[str, torch.Tensor], prefix: str, precision: WeightPrecision
    ) -> None:
        attn, mlp = f"{prefix}.self_attn", f"{prefix}.mlp"
        self.input_norm = w[f"{prefix}.input_layernorm.weight"]
        self.post_norm = w[f"{prefix}.post_attention_layernorm.weight"]
        self.qkv = quant.projection(
            precision,
            [w[f"{attn}.{p}_proj.weight"] for p in "qkv"],
            [w[f"{attn}.{p}_proj.bias"] if spec.qkv_bias else None for p in "qkv"],
        )
        # Qwen3's per-head norms of q and of k, as one weight over the heads of both
        self.qk_norm = (
            torch.cat(
                [
                    w[f"{attn}.q_norm.weight"].expand(spec.num_heads, -1),
                    w[f"{attn}.k_norm.weight"].expand(spec.num_kv_heads, -1),
                ]
            )
            if spec.qk_norm
            else None
        )
        self.o_proj = quant.projection(precision, [w[f"{attn}.o_proj.weight"]], [None])
        self.gate_up = quant.projection(
            precision, [w[f"{mlp}.gate_proj.weight"], w[f"{mlp}.up_proj.weight"]], [None, None]
        )
        self.down = quant.projection(precision, [w[f"{mlp}.down_proj.weight"]], [None])

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in (self.qkv, self.o_proj, self.gate_up, self.down))


class Transformer:
    """Weights plus the forward; holds no KV and no per-request state.

    `dtype` is the activations' (and so the KV's); `precision` is how the projections and the LM head
    hold their weights, which may be narrower (model/quant.py)."""

    def __init__(
        self, spec: ModelSpec, weights: Mapping[str, torch.Tensor], precision: WeightPrecision = "fp32"
    ) -> None:
        self.spec = spec
        self.precision = precision
        embed_tokens = weights["model.embed_tokens.weight"]
        self.dtype = embed_tokens.dtype
        self.layers = [_Layer(spec, weights, f"model.layers.{i}", precision) for i in range(spec.num_layers)]
        self.norm = weights["model.norm.weight"]
        head = embed_tokens if spec.tie_word_embeddings else weights["lm_head.weight"]
        self.head = quant.head(precision, head)
        self.embedding = self.head if spec.tie_word_embeddings else quant.Linear(embed_tokens, None)
        self._hidden = (spec.hidden_size,)
        self._heads = (spec.num_heads, spec.num_kv_heads)
        # csrc's fused layer ops: with its quantized kernels only (fp32 keeps the reference's torch ops)
        self._ops = quant.fused_ops(precision)

    @property
    def step_bytes(self) -> int:
        """Weight bytes one forward reads whatever its size: every projection and the LM head."""
        return sum(layer.nbytes for layer in self.layers) + self.head.nbytes

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """`[T]` token ids -> `[T, hidden]`."""
        return self.embedding.rows(token_ids)

    def layer(
        self, index: int, hidden: torch.Tensor, batch: AttentionBatch, kv: torch.Tensor
    ) -> torch.Tensor:
        """Run decoder layer `index` on `[T, hidden]`, writing the new K/V into `kv` (that layer's KV)."""
        spec, w = self.spec, self.layers[index]
        heads, kv_heads = self._heads
        eps = spec.rms_norm_eps
        qkv = w.qkv(hidden, norm=w.input_norm, eps=eps).to(self.dtype)
        qkv = qkv.view(-1, heads + 2 * kv_heads, spec.head_dim)
        if w.qk_norm is not None:
            qkv[:, : heads + kv_heads] = _rms_norm(qkv[:, : heads + kv_heads], w.qk_norm, eps)
        window = spec.sliding_window[index]
        if self._ops is not None:  # RoPE on q and k, and k, v into the pool: one pass
            q = self._ops.rope_store(qkv, batch.cos, batch.sin, kv, batch.slot_mapping, heads)
            out = batch.backend(kv.device).attend(q, kv, batch, window)
        else:
            qk = _rotate(qkv[:, : heads + kv_heads], batch.cos, batch.sin)
            out = attention(qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads :], kv, batch, window)
        # bf16 outputs (torch's packed kernels): the residual adds promote them to the model's dtype
        hidden = w.o_proj(out.reshape(len(hidden), -1).to(w.o_proj.dtype), residual=hidden)
        gate_up = w.gate_up(hidden, norm=w.post_norm, eps=eps)
        return w.down(gate_up, gate=True, residual=hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[N, hidden]` -> `[N, vocab]` in fp32 (sampling wants fp32 whatever the KV dtype)."""
        x = F.rms_norm(hidden, self._hidden, self.norm, self.spec.rms_norm_eps)
        return self.head(x.to(self.head.dtype)).float()

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin for `[T]` positions, `[T, 1, head_dim]`, computed once per forward for all
        layers. The sin's first half is negated: `_rotate` then needs no negation of its own."""
        freqs = positions[:, None].float() * self.spec.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]
        scale = self.spec.rope_scale
        sign = torch.ones(emb.shape[-1])
        sign[: emb.shape[-1] // 2] = -1.0
        return (emb.cos() * scale).to(self.dtype), (emb.sin() * (sign * scale)).to(self.dtype)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm, for a weight that broadcasts (Qwen3's per-head q/k norms)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`x * cos + rotate_half(x) * sin`: rotate_half(x) = (-x2, x1) = roll(x) * (-1, 1), the sign in `sin`."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)
