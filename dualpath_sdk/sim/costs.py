"""What compute costs on one engine, from FLOPs and bytes (PAPER.md: compute from FLOPs), and the rates a
deployment would profile from it before serving: the PE prefill rate behind beta, the attention model
behind the compute quota."""

from __future__ import annotations

from dualpath_sdk.scheduler import AttentionModel, fit_attention_model
from dualpath_sdk.sim.presets import Model
from dualpath_sdk.sim.workload import Trajectories


class ModelCost:
    """FLOP- and byte-based costs of one model on one engine."""

    def __init__(self, model: Model, flops: float, hbm_bps: float) -> None:
        self.m = model
        self.flops = flops * model.gpus_per_engine
        self.hbm = hbm_bps * model.gpus_per_engine
        self.kv = model.kv_bytes_per_token
        self.step_base = model.decode_overhead_s + model.weight_bytes / (model.weight_gpus * hbm_bps)
        self.per_seq = 2 * model.active_params / self.flops

    def attention_flops(self, ctx: int, new: int) -> float:
        mean_ctx = ctx + new / 2
        keys = min(mean_ctx, self.m.attn_topk) if self.m.attn_topk else mean_ctx
        return new * (self.m.attn_flops_per_pair * keys + self.m.index_flops_per_pair * mean_ctx)

    def attention_s(self, ctx: int, new: int) -> float:
        return self.attention_flops(ctx, new) / self.flops

    def prefill_s(self, ctx: int, new: int) -> float:
        return (2 * self.m.active_params * new + self.attention_flops(ctx, new)) / self.flops

    def decode_read_bytes(self, ctx: int) -> float:
        keys = min(ctx, self.m.attn_topk) if self.m.attn_topk else ctx
        return keys * self.kv + ctx * self.m.index_bytes_per_token

    def step_s(self, n: int, attended: float) -> float:
        return self.step_base + n * self.per_seq + attended / self.hbm

    def prefill_rate(self, traj: Trajectories, block_tokens: int) -> float:
        """len(r)-tokens per second one PE prefills on this workload (tok_e counts len(r), so beta must)."""
        ctx = int(traj.first_prompt.mean()) + int((traj.append + traj.gen).sum(axis=1).mean()) // 2
        new = int(traj.append.mean()) + block_tokens // 2
        return ctx / self.prefill_s(ctx, new)

    def attention_model(self) -> AttentionModel:
        """The intra-PE batching model, fitted to this cost's attention times as an engine fits its own."""
        samples = [
            (c, n, self.attention_flops(c, n) / self.flops)
            for c in (0, 4096, 16384, 32768, 65536)
            for n in (64, 512, 2048, 8192)
        ]
        return fit_attention_model(samples)
