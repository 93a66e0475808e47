"""The cluster's metrics: counters in a Prometheus registry of its own (one per cluster, so two
clusters in one process never mix), read with `registry.get_sample_value` or served as text."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from dualpath_sdk.engine.messages import Report

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Counters, histograms and gauges of one cluster; the controller updates them as steps end and
    engines report."""

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
        self.queue_full = Counter(
            "dualpath_queue_full_refusals",
            "Steps refused because the cluster held max_steps already (QueueFull)",
            registry=r,
        )
        self.engine_restarts = Counter(
            "dualpath_engine_restarts",
            "Engine processes respawned after they died or hung",
            ["engine"],
            registry=r,
        )
        self.tokens = Counter(
            "dualpath_tokens",
            "Tokens of finished steps: prompt, cached (loaded) and generated",
            ["kind"],
            registry=r,
        )
        self.kv_read_bytes = Counter(
            "dualpath_kv_read_bytes", "KV read from storage, by the side that read it", ["side"], registry=r
        )
        self.ttft = Histogram("dualpath_ttft_seconds", "Time to first token", buckets=_SECONDS, registry=r)
        self.tpot = Histogram(
            "dualpath_tpot_seconds", "Time per output token after the first", buckets=_SECONDS, registry=r
        )
        self.queue_wait = Histogram(
            "dualpath_queue_seconds",
            "Time a step waited for its engines: the global queue, then its DE group's",
            buckets=_SECONDS,
            registry=r,
        )
        self.engine_tokens = Gauge(
            "dualpath_engine_tokens",
            "Tokens of the requests an engine holds (its last report)",
            ["engine"],
            registry=r,
        )
        self.engine_read_queue = Gauge(
            "dualpath_engine_read_queue_tokens",
            "Tokens queued on an engine's storage reads",
            ["engine"],
            registry=r,
        )
        self.engine_free_tokens = Gauge(
            "dualpath_engine_free_tokens",
            "KV memory a DE can still hand out, in tokens",
            ["engine"],
            registry=r,
        )

        self.buffer_used = Gauge(
            "dualpath_buffer_used_ratio",
            "Share of an engine's host buffer slots in use",
            ["engine"],
            registry=r,
        )
        self.store_reads = Gauge(
            "dualpath_store_block_reads",
            "Full Block reads of an engine's process so far (from 0 again after a restart), by result",
            ["engine", "result"],
            registry=r,
        )

    def step_finished(
        self,
        prompt: int,
        cached: int,
        generated: int,
        bytes_pe: int,
        bytes_de: int,
        queue_s: float,
        ttft_s: float,
        decode_s: float,
    ) -> None:
        self.steps.labels("ok").inc()
        for kind, n in (("prompt", prompt), ("cached", cached), ("generated", generated)):
            self.tokens.labels(kind).inc(n)
        self.kv_read_bytes.labels("pe").inc(bytes_pe)
        self.kv_read_bytes.labels("de").inc(bytes_de)
        self.queue_wait.observe(queue_s)
        self.ttft.observe(ttft_s)
        if generated > 1:
            self.tpot.observe(decode_s / (generated - 1))

    def engine_report(self, engine: str, role: str, report: Report) -> None:
        self.engine_tokens.labels(engine).set(report.tokens)
        self.engine_read_queue.labels(engine).set(report.read_q)
        if role == "de":
            self.engine_free_tokens.labels(engine).set(report.free_tokens)
        if report.buffer_slots:
            self.buffer_used.labels(engine).set(1 - report.buffer_free / report.buffer_slots)
        for result, n in zip(("hit", "miss", "quarantined"), report.store_reads, strict=True):
            self.store_reads.labels(engine, result).set(n)
