"""Weight precisions: how a projection holds its weights and multiplies by them.

`fp32` is the reference, exact against transformers. The quantized forms are weight-only:
- `int8`: projections int8 per output channel, bf16 scales;
- `int4`: projections int4 in groups of 32, asymmetric (GGUF's Q4_1 block: the default model's Q4_1
  weights come back as themselves, up to their bf16 scales).
Both keep the embedding in fp32 (a lookup reads a row, not the table) and compute the LM head in int8
with its best logits redone in fp32 (RescoredHead). A decode step reads every weight once, so its
linears cost the weights' bytes over memory bandwidth: int8 reads about a quarter of fp32's, int4 an
eighth.

Exactness within the engine needs a token's KV to be the same bits whichever forward computed it
(decode, a prefill chunk, a long prefill, a batch): reuse must equal recompute. So every row count
takes one kernel whose rows are bitwise independent of each other: csrc/quant_linear.cpp (fp32
activations, each output's sums in one fixed order, the layer's norms and residuals fused in), or,
where it cannot be built, torch's packed kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`:
bf16 activations, row-independent too, measured, but 2-2.5x slower than an fp32 GEMM in prefill). The
two round differently, so each has its own scheme in the model fingerprint (`scheme`). Not an fp32 GEMM over
dequantized weights for prefill, as before: its sums run in another order than the kernel's, a bf16
ulp apart in ~1e-4 of the outputs, which made reuse and recompute diverge in 1-2 of 8 chats.

Engines choose per checkpoint by default (EngineConfig.weights "auto", `auto_precision`): int4 where
the projections lie on a 4-bit grid already (`on_int4_grid`: the default model's Q4_1 GGUF), since int4
then holds the file's own weights; fp32 for an fp32 checkpoint, where int4 would be an approximation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from dualpath_sdk.config import WeightChoice, WeightPrecision
from dualpath_sdk.errors import InvalidInput

GROUP = 32  # GGUF's Q4_1 block, and the int4 kernel's smallest group
RESCORED = 32  # logits of the int8 head recomputed in fp32 (RescoredHead)
SCHEMES: dict[WeightPrecision, str] = {  # part of the model fingerprint: a new scheme is new KV
    "fp32": "",
    "int8": "projections int8 per channel bf16 scales",
    "int4": "projections int4 g32 asymmetric least-squares bf16 scales",
}
_KERNELS = {
    True: "csrc fma chains, int4 group sums, fp32 activations, fused norms, swiglu and rope, v3",
    False: "torch packed, bf16 activations, v2",
}
GRID_ROWS = 64  # rows of each projection on_int4_grid checks (a file quantizes each tensor whole, one type)


def _ops() -> Any | None:
    from dualpath_sdk.model.kernel import quant_ops

    return quant_ops()


def fused_ops(precision: WeightPrecision) -> Any | None:
    """csrc's ops for `precision`'s layers (its linears take their norms and residuals, `rope_store`
    the RoPE and K/V store), or None: fp32 and torch's packed kernels run the layer in torch ops."""
    return None if precision == "fp32" else _ops()


def scheme(precision: WeightPrecision) -> str:
    """What decides the bytes of KV computed under `precision`'s weights here: the quantization and the
    kernel that multiplies by it ("" for fp32, whose KV keys stay as they were)."""
    if not SCHEMES[precision]:
        return ""
    return f"{SCHEMES[precision]}; {_KERNELS[_ops() is not None]}"


class Projection(Protocol):
    """`x @ W.T (+ b)`, with the layer's work around it: the input RMS-normalized by `norm` first (the
    layer norms), or SwiGLU's `silu(gate) * up` of x's two halves (`gate`: x is the gate/up projection's
    output); the `residual` added after. csrc's kernels do it in the same call (in a decode step those
    small ops, dispatched one by one, cost about as much as the linears), torch's paths in torch ops.
    The result comes in `dtype`, the one the multiplication runs in (or the bias's or residual's, wider):
    the caller casts only where the next op needs it."""

    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Bytes one multiplication reads of the weights (the decode step's floor)."""
        ...

    def __call__(
        self,
        x: torch.Tensor,
        *,
        norm: torch.Tensor | None = None,
        eps: float = 0.0,
        gate: bool = False,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


class Head(Protocol):
    """The LM head, `x @ W.T`, which is also the tied embedding table."""

    dtype: torch.dtype

    @property
    def nbytes(self) -> int: ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of W, in the model's dtype: the embedding lookup of a tied LM head."""
        ...


def _input(
    x: torch.Tensor, dtype: torch.dtype, norm: torch.Tensor | None, eps: float, gate: bool
) -> torch.Tensor:
    """A projection's input on torch's paths: x, RMS-normalized or SwiGLU'd, in `dtype`."""
    if norm is not None:
        x = F.rms_norm(x, x.shape[-1:], norm, eps)
    elif gate:
        g, up = x.chunk(2, dim=-1)
        x = F.silu(g) * up
    return x.to(dtype)


def _finish(y: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None) -> torch.Tensor:
    y = y if bias is None else y + bias
    return y if residual is None else residual + y


class Linear:
    """`y = x @ W.T + b` with W in the model's dtype: the fp32 reference."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias = weight, bias
        self.dtype = weight.dtype

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes

    def __call__(
        self,
        x: torch.Tensor,
        *,
        norm: torch.Tensor | None = None,
        eps: float = 0.0,
        gate: bool = False,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        y = F.linear(_input(x, self.dtype, norm, eps, gate), self.weight, self.bias)
        return _finish(y, None, residual)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class Int8Linear:
    """int8 per output channel with bf16 scales, `y = scale * sum(x * q)`: csrc's `int8_linear` (weights
    as `[out / 16, in, 16]`, fp32 activations), else `_weight_int8pack_mm` (bf16 ones)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        n, k = weight.shape
        self._ops = _ops()
        if n % 16 or (self._ops is None and k % 16):  # torch's kernel reads K in steps of 16
            raise InvalidInput(f"int8 weights need in and out features divisible by 16, not {n}x{k}")
        w = weight.float()
        self.scale = (w.abs().amax(1) / 127).clamp(min=1e-12).to(torch.bfloat16)
        self.q = (w / self.scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
        if self._ops is not None:
            self.dtype = torch.float32
            self.q = self.q.view(n // 16, 16, k).transpose(1, 2).contiguous()
            self.scale = self.scale.float()
        else:
            self.dtype = torch.bfloat16
        self.bias = bias

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes

    def weight(self) -> torch.Tensor:
        """The fp32 weights the kernel multiplies by, `[out, in]` (scaled after the sum, in it)."""
        q = self.q if self._ops is None else self.q.transpose(1, 2).reshape(-1, self.q.shape[1])
        return q.float() * self.scale.float()[:, None]

    def __call__(
        self,
        x: torch.Tensor,
        *,
        norm: torch.Tensor | None = None,
        eps: float = 0.0,
        gate: bool = False,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self._ops is not None:
            return self._ops.int8_linear(x, self.q, self.scale, norm, eps, gate, self.bias, residual)
        y = torch.ops.aten._weight_int8pack_mm(_input(x, self.dtype, norm, eps, gate), self.q, self.scale)
        return _finish(y, self.bias, residual)


class Int4Linear:
    """int4 in groups of GROUP, asymmetric (Q4_1's levels, min to max in 15 steps): `w = (q - 8) * scale +
    zero`, `q` in 0..15, one bf16 scale and zero per group. csrc's `int4_linear` (nibbles `[out / 16, in / 2,
    16]`, scale and zero `[out / 16, in / 32, 16]`, fp32 activations; it sums `x * q` per group and applies
    the group's scale and zero to the sum), else `_weight_int4pack_mm_for_cpu` in its own CPU-specific
    packing (bf16 activations)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        n, k = weight.shape
        if k % GROUP or n % 16:
            raise InvalidInput(
                f"int4 weights need in_features divisible by {GROUP}, out_features by 16: {n}x{k}"
            )
        groups = weight.float().view(n, k // GROUP, GROUP)
        low, high = groups.amin(-1), groups.amax(-1)
        step = ((high - low) / 15).clamp(min=1e-12)
        levels = ((groups - low[..., None]) / step[..., None]).round().clamp(0, 15) - 8
        scale, zero = _fit_bf16(groups, levels, step, low + 8 * step)
        q = (levels + 8).view(n, k).to(torch.uint8)
        self._ops = _ops()
        self.dtype = torch.bfloat16 if self._ops is None else torch.float32
        if self._ops is not None:

            def blocked(t: torch.Tensor) -> torch.Tensor:  # [out, m] -> [out / 16, m, 16]
                return t.view(n // 16, 16, -1).transpose(1, 2).contiguous()

            self.packed = blocked(q[:, 0::2] | (q[:, 1::2] << 4))
            self.params: tuple[torch.Tensor, ...] = tuple(
                blocked(t.to(torch.bfloat16)) for t in (scale, zero)
            )
        else:
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 1)
            self.params = (torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16),)
        self.bias = bias
        # for weight(): torch's packing is opaque
        self._levels_scale_zero = (q, scale, zero) if self._ops is None else None

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + sum(p.nbytes for p in self.params)

    def weight(self) -> torch.Tensor:
        """The fp32 weights the kernel multiplies by, `[out, in]`: `(q - 8) * scale + zero`."""
        if self._levels_scale_zero is not None:
            q, scale, zero = self._levels_scale_zero
        else:
            nibbles = self.packed.transpose(1, 2).reshape(-1, self.packed.shape[1])
            q = torch.stack([nibbles & 15, nibbles >> 4], -1).view(len(nibbles), -1)
            scale, zero = (t.transpose(1, 2).reshape(len(q), -1).float() for t in self.params)
        w = q.float().view(len(q), -1, GROUP) - 8
        return torch.addcmul(zero[..., None], w, scale[..., None]).view(len(q), -1)

    def __call__(
        self,
        x: torch.Tensor,
        *,
        norm: torch.Tensor | None = None,
        eps: float = 0.0,
        gate: bool = False,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self._ops is not None:
            return self._ops.int4_linear(x, self.packed, *self.params, norm, eps, gate, self.bias, residual)
        x = _input(x, self.dtype, norm, eps, gate)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, *self.params)
        return _finish(y, self.bias, residual)


class RescoredHead:
    """The quantized forms' LM head: int8 per channel for all the logits, then the RESCORED best of
    them recomputed from the fp32 weights (also the embedding's rows), per row (no batched GEMM whose
    sums could depend on the batch). Greedy picks, and the head of
    a sampled distribution, are then the fp32 head's: the int8 head alone flipped 2% of the forced
    top-1 picks on the default model; the fp32 head costs 3x its time (113 MB a step, not 28)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight, self.dtype = weight, weight.dtype
        self.approx = Int8Linear(weight, None)

    @property
    def nbytes(self) -> int:
        return self.approx.nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.approx(x.to(self.approx.dtype)).float()
        best = logits.topk(min(RESCORED, logits.shape[-1]), dim=-1).indices  # [N, RESCORED]
        exact = (self.weight[best] * x.float()[:, None, :]).sum(-1)
        return logits.scatter_(-1, best, exact.float())

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


def _fit_bf16(
    groups: torch.Tensor, levels: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 scale and zero per group for which `levels * scale + zero` fits `groups` best in least
    squares, of the bf16 values next to the exact `scale` and, for each, next to its best zero.
    Rounding both to nearest left a Q4_1 file's weights ~6% of a step off, this ~1%: int4's KL to
    fp32 3x lower. A candidate's error is a quadratic form in its offsets from the exact pair over
    per-group sums (small numbers: no cancellation), so no candidate touches the weights."""
    residual = groups - (levels * scale[..., None] + zero[..., None])
    count = groups.shape[-1]
    sum_l, sum_ll = levels.sum(-1), levels.pow(2).sum(-1)
    pull_l, pull_1 = (levels * residual).sum(-1), residual.sum(-1)
    best_scale, best_zero, best_err = scale, zero, torch.full_like(scale, float("inf"))
    for s in _bf16_around(scale):
        ds = s - scale
        for z in _bf16_around(zero + (pull_1 - sum_l * ds) / count):
            dz = z - zero
            err = sum_ll * ds**2 + 2 * sum_l * ds * dz + count * dz**2 - 2 * (pull_l * ds + pull_1 * dz)
            better = err < best_err
            best_scale, best_zero = torch.where(better, s, best_scale), torch.where(better, z, best_zero)
            best_err = torch.minimum(err, best_err)
    return best_scale, best_zero


def _bf16_around(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`x` rounded to bf16 and its two bf16 neighbours, as fp32."""
    b = x.to(torch.bfloat16)
    up, down = torch.full_like(b, float("inf")), torch.full_like(b, float("-inf"))
    return tuple(v.float() for v in (torch.nextafter(b, down), b, torch.nextafter(b, up)))


def on_int4_grid(weights: Mapping[str, torch.Tensor]) -> bool:
    """Whether every projection's groups of GROUP lie on 16 equidistant levels from their min to their
    max, as a Q4_0 / Q4_1 file's do (dequantized: `d * q + m`): int4 then holds the checkpoint's own
    weights (up to its bf16 scales), not an approximation of them. Checked on GRID_ROWS rows of each:
    fp32 weights miss the grid by ~0.5 of a step, a 4-bit file's by ~1e-6."""
    projections = [w for name, w in weights.items() if name.endswith("_proj.weight")]
    if not projections or any(w.shape[-1] % GROUP for w in projections):
        return False
    for w in projections:
        groups = w[:GRID_ROWS].float().reshape(-1, GROUP)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        levels = (groups - low) / ((high - low) / 15).clamp(min=1e-30)
        if (levels - levels.round()).abs().amax() > 1e-3:
            return False
    return True


def auto_precision(choice: WeightChoice, weights: Mapping[str, torch.Tensor]) -> WeightPrecision:
    """EngineConfig.weights resolved for a checkpoint: "auto" is int4 where the projections are 4-bit
    already and csrc's kernel runs them (the default model: greedy tokens identical to fp32's on the
    agreement prompts, decode ~3x fp32's, prefill as fast; bench engine), else fp32, the reference.
    Not on torch's packed kernels: their prefill is 2-2.5x slower than fp32's."""
    if choice != "auto":
        return choice
    return "int4" if _ops() is not None and on_int4_grid(weights) else "fp32"


def projection(
    precision: WeightPrecision, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]
) -> Projection:
    """One linear over projections that read the same input (q/k/v; gate/up), outputs side by side:
    one call instead of three (or two) per layer, and q, k adjacent for one RoPE pass."""
    weight = torch.cat(list(weights)) if len(weights) > 1 else weights[0]
    bias = None if biases[0] is None else torch.cat([b for b in biases if b is not None])
    if precision == "int8":
        return Int8Linear(weight, bias)
    if precision == "int4":
        return Int4Linear(weight, bias)
    return Linear(weight, bias)


def head(precision: WeightPrecision, weight: torch.Tensor) -> Head:
    """The LM head (and tied embedding table): fp32, or rescored int8 in both quantized forms."""
    return Linear(weight, None) if precision == "fp32" else RescoredHead(weight)
