"""Configuration models: the one place every knob is named, typed and defaulted."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Mode = Literal["dualpath", "basic", "oracle"]
"""How a cluster runs: the paper's design, its baseline, or the I/O-free ceiling (ClusterConfig.mode)."""
ReadPlanChoice = Literal["auto", "pe", "de", "split"]
"""Which side reads a step's cached blocks: the scheduler's choice, or forced (ClusterConfig.read_plan)."""
WeightPrecision = Literal["fp32", "int8", "int4"]
"""How an engine holds its model's weights (EngineConfig.weights; model/quant.py says what each is)."""
WeightChoice = Literal["auto", "fp32", "int8", "int4"]
"""A precision, or "auto": the one the checkpoint's own weights call for (model/quant.auto_precision)."""
KVDtype = Literal["fp32", "bf16", "fp16"]
"""The dtype of an engine's KV in every tier (EngineConfig.kv_dtype): pool, Full Blocks, buffers, wire."""
KVChoice = Literal["auto", "fp32", "bf16", "fp16"]
"""A KV dtype, or "auto": fp32 beside fp32 weights, fp16 beside quantized ones (engine/core.kv_dtype)."""


def cache_dir() -> Path:
    """Where converted models and the default store live: `$DUALPATH_CACHE`, else ~/.cache/dualpath."""
    return Path(os.environ.get("DUALPATH_CACHE", Path.home() / ".cache" / "dualpath"))


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SchedulerConfig(_Config):
    """The paper's scheduling knobs (PAPER.md, Scheduling); defaults are the paper's values.

    alpha and beta are expressed in seconds of work and turned into token thresholds from
    measured rates: alpha = tokens one storage NIC reads in `alpha_s`, beta = tokens one
    engine prefills in `beta_s`.
    """

    alpha_s: float = Field(default=3.0, gt=0)
    beta_s: float = Field(default=5.0, gt=0)
    de_slack: float = Field(default=1.05, ge=1.0)
    compute_quota_s: float = Field(default=0.3, gt=0)
    # The least a batch's first request prefills when it crosses the quota (up to max_batch_tokens).
    # The quota, calibrated for GPUs, cut a CPU PE's cold 6.6K-token prompt into 64-token chunks, each
    # loading back every earlier chunk's KV: 1.4x the engine core's time; at 2048, 0.99x.
    min_chunk_tokens: int = Field(default=2048, ge=0)
    # Split one request's read across both SNICs (the paper's future work); False is the paper's rule.
    split_reads: bool = True


class EngineConfig(_Config):
    """One engine's weight precision, KV pool and batching limits."""

    block_size: int = Field(default=64, ge=1, description="tokens per KV block (Full Block / Layer Block)")
    num_blocks: int = Field(default=1024, ge=1, description="blocks in the engine's KV pool")
    max_batch_tokens: int = Field(
        default=2048,
        ge=1,
        description="tokens one forward may compute; longer prompts are prefilled in chunks",
    )
    max_running: int = Field(default=64, ge=1, description="sequences decoding at once")
    weights: WeightChoice = Field(
        default="auto",
        description="fp32: exact against transformers; int8 (per channel) / int4 (groups of 32): "
        "weight-only, about a quarter / an eighth of the bytes a decode step reads (model/quant.py); "
        "auto: int4 for a checkpoint whose projections are 4-bit already (a Q4_0/Q4_1 GGUF such as "
        "the default model), fp32 otherwise",
    )
    kv_dtype: KVChoice = Field(
        default="auto",
        description="fp32: exact against transformers; bf16 / fp16: half the bytes per cached token in "
        "the pool, the store, the buffers and every transfer (its own block namespace); auto: fp32 "
        "with fp32 weights, fp16 with quantized ones",
    )


class MooncakeConfig(_Config):
    """Where the Mooncake Store's master runs and how much memory this client lends the store."""

    master_address: str = "127.0.0.1:50051"
    metadata_server: str = "P2PHANDSHAKE"
    local_hostname: str = "127.0.0.1"
    protocol: Literal["tcp", "rdma"] = "tcp"
    device_name: str = ""
    global_segment_bytes: int = Field(default=512 << 20, gt=0)
    local_buffer_bytes: int = Field(default=128 << 20, gt=0)


class StoreConfig(_Config):
    """The persistent store. `snic_*_bps` cap this node's storage NIC (None: no cap, the default)."""

    backend: Literal["fs", "mooncake"] = "fs"
    root: Path = Field(default_factory=lambda: cache_dir() / "store")
    capacity_bytes: int | None = Field(default=None, gt=0)
    read_threads: int = Field(default=16, gt=0)
    direct_io: bool = True
    reserve_bytes: int = Field(
        default=64 << 20, ge=0, description="free space block writes leave (manifests stay writable)"
    )
    index_journal: Literal["WAL", "DELETE"] = "WAL"
    index: Literal["sqlite", "shared"] = Field(
        default="sqlite", description="fs: sqlite (one host's processes) or shared (hosts sharing root)"
    )
    snic_read_bps: float | None = Field(default=None, gt=0)
    snic_write_bps: float | None = Field(default=None, gt=0)
    mooncake: MooncakeConfig = MooncakeConfig()


class TransferConfig(_Config):
    """The one-sided transport between PE and DE processes (DESIGN.md, Transports).

    `link_bps` emulates this node's compute NIC: one rate shared by the node's processes, with the
    `model` class served first and `kv` taking what is left (None: no emulation, full speed).
    `kv_service_level` / `kv_traffic_class` are the InfiniBand SL / RoCE traffic class of the
    mooncake transport on RDMA (Mooncake's MC_IB_SL / MC_IB_TC); TCP has no lanes and ignores them.
    """

    backend: Literal["local", "mooncake"] = "local"
    link_bps: float | None = Field(default=None, gt=0)
    chunk_bytes: int = Field(default=512 << 10, ge=4096, description="link scheduling granularity")
    link_burst_s: float = Field(default=0.002, ge=0, description="idle link time a sender may save up")
    model_grace_s: float = Field(
        default=0.005, ge=0, description="kv keeps yielding this long after a model chunk (stream gaps)"
    )
    timeout_s: float = Field(default=30.0, gt=0, description="deadline of every transfer and wait")
    shm_dir: Path = Path("/dev/shm")
    kv_service_level: int | None = Field(default=None, ge=0, le=15)
    kv_traffic_class: int | None = Field(default=None, ge=0, le=255)
    mooncake_hostname: str = "127.0.0.1"
    mooncake_protocol: Literal["tcp", "rdma"] = "tcp"
    mooncake_device: str = Field(default="", description="RDMA devices, e.g. 'mlx5_0'; '' on TCP")


class ClusterConfig(_Config):
    """An embedded cluster: its model, its nodes (one engine per node here), and their tiers."""

    model: str | None = Field(default=None, description="HF directory or .gguf file; None: the default model")
    prefill_nodes: int = Field(default=1, ge=1)
    decode_nodes: int = Field(default=1, ge=1)
    mode: Mode = Field(
        default="dualpath",
        description="basic: PE-only reads, no layer-wise overlap, round-robin PEs (the paper's baseline); "
        "oracle: reads and KV transfers skipped (the I/O-free ceiling; its text is meaningless)",
    )
    read_plan: ReadPlanChoice = Field(
        default="auto",
        description="the read side of every step; auto: the scheduler's (the shorter read queue, or "
        "split in proportion to both queues' drain when scheduler.split_reads)",
    )
    scheduler: SchedulerConfig = SchedulerConfig()
    engine: EngineConfig = EngineConfig()
    store: StoreConfig = Field(default_factory=StoreConfig)
    transfer: TransferConfig = TransferConfig()
    buffer_slots: int = Field(default=256, ge=1, description="Full Block slots of each node's host buffer")
    threads_per_engine: int = Field(default=1, ge=1, description="torch threads of each engine process")
    startup_timeout_s: float = Field(default=180.0, gt=0)
    max_steps: int = Field(
        default=256, ge=1, description="steps admitted at once, queued or running; beyond: QueueFull"
    )
