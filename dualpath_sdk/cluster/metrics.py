"""The cluster's metrics: counters in a Prometheus registry of its own (one per cluster, so two
clusters in one process never mix), read with `registry.get_sample_value` or served as text."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.steps = Counter(
            "dualpath_steps", "Steps ended, by outcome: ok or the error's kind", ["outcome"], registry=r
        )
        self.retries = Counter(
            "dualpath_step_retries",
            "Steps retried elsewhere after an engine died or a transfer failed",
            registry=r,
        )
        self.persisted = Counter("dualpath_persisted_blocks", "Full Blocks written to the store", registry=r)
        self.persist_failed = Counter(
            "dualpath_persist_failed_blocks",
            "Full Blocks that failed to persist (recomputed later)",
            registry=r,
        )
        self.pin_failed = Counter(
            "dualpath_pin_failed_steps",
            "Steps whose blocks could not be pinned (they stay, unprotected)",
            registry=r,
        )
        self.engine_restarts = Counter(
            "dualpath_engine_restarts",
            "Engine processes respawned after they died or hung",
            ["engine"],
            registry=r,
        )
