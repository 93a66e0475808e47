"""Configuration models: the one place every knob is named, typed and defaulted."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


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
    # Split one request's read across both SNICs (the paper's future work); False is the paper's rule.
    split_reads: bool = True


class EngineConfig(_Config):
    """One engine's KV pool and batching limits."""

    block_size: int = Field(default=64, ge=1, description="tokens per KV block (Full Block / Layer Block)")
    num_blocks: int = Field(default=1024, ge=1, description="blocks in the engine's KV pool")
    max_batch_tokens: int = Field(
        default=2048, ge=1, description="tokens one forward may compute; longer prompts are prefilled in chunks"
    )
    max_running: int = Field(default=64, ge=1, description="sequences decoding at once")
