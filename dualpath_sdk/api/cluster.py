"""Cluster: the engine cluster a program embeds (`Cluster.local`), and the sessions it serves."""

from __future__ import annotations

import logging
import queue
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from pydantic import ValidationError
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from dualpath_sdk.api.inputs import SessionOptions, validated
from dualpath_sdk.api.session import Session
from dualpath_sdk.cluster.controller import StepOutcome, StepRequest
from dualpath_sdk.cluster.launcher import LocalLauncher
from dualpath_sdk.config import ClusterConfig, StoreConfig
from dualpath_sdk.errors import DualPathError, InvalidInput, StepTimeout, StorageError
from dualpath_sdk.fsutil import check_writable
from dualpath_sdk.kv.keys import BlockKey, namespace_key
from dualpath_sdk.model.loader import default_model_dir, resolve_model_dir
from dualpath_sdk.model.spec import ModelSpec
from dualpath_sdk.store import BlockStore, open_store
from dualpath_sdk.store.limiter import granted_bytes
from dualpath_sdk.store.manifest import ManifestStore

STEP_TIMEOUT_S = 600.0
log = logging.getLogger(__name__)


class Cluster:
    """Prefill and decode engine processes, their storage tiers, and the sessions on top.

    Use as a context manager (or call `close`): it owns processes and shared memory.
    """

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self._closed = True  # until it has started
        path = default_model_dir() if config.model is None else resolve_model_dir(Path(config.model))
        try:
            hf_config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"cannot read the model's config in {path}: {exc}") from None
        spec = ModelSpec.from_hf_config(hf_config)
        self.vocab_size = spec.vocab_size
        self.max_context = spec.max_position
        self.block_size = config.engine.block_size
        self.tokenizer: PreTrainedTokenizerBase | None = (
            AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
        )
        check_writable(config.store.root)
        self.store: BlockStore = open_store(config.store, node="client")
        self.manifests = ManifestStore(config.store.root / "sessions")
        try:
            self._launcher = LocalLauncher(config, str(path))
        except BaseException:
            self.store.close()
            raise
        self._hello = next(iter(self._launcher.controller.engines.values())).hello
        self._closed = False

    @classmethod
    def local(
        cls,
        model: str | Path | None = None,
        prefill_nodes: int = 1,
        decode_nodes: int = 1,
        storage: str | Path | StoreConfig | None = None,
        **overrides: Any,
    ) -> Cluster:
        """An embedded cluster on this machine: one engine process per node.

        `storage`: the store's directory, or a whole StoreConfig (also accepted as `store=`);
        `overrides`: any other ClusterConfig field."""
        if storage is not None and "store" in overrides:
            raise InvalidInput("give the store as storage= or as store=, not both")
        store = overrides.pop("store", storage)
        if isinstance(store, (str, Path)):
            store = {"root": Path(store)}
        try:
            config = ClusterConfig.model_validate(
                {
                    "model": None if model is None else str(model),
                    "prefill_nodes": prefill_nodes,
                    "decode_nodes": decode_nodes,
                    **({} if store is None else {"store": store}),
                    **overrides,
                }
            )
        except ValidationError as exc:
            raise InvalidInput(f"bad cluster configuration: {exc}") from None
        return cls(config)

    def session(
        self,
        system: str | None = None,
        session_id: str | None = None,
        tenant: str = "default",
        ttl_s: float = 3600.0,
    ) -> Session:
        """A new session, or (`session_id` of an existing one) that session resumed from its manifest."""
        o = validated(
            SessionOptions,
            "session",
            {"system": system, "session_id": session_id, "tenant": tenant, "ttl_s": ttl_s},
        )
        system, session_id, tenant, ttl_s = o.system, o.session_id, o.tenant, o.ttl_s
        self.check_open()
        if session_id is not None and self.manifests.path_of(session_id).exists():
            if system is not None:
                raise InvalidInput("a resumed session keeps its system prompt")
            return Session(self, self.manifests.load(session_id))
        manifest = self.manifests.new(tenant, ttl_s, session_id)
        if system is not None:
            manifest = self.manifests.save(
                manifest.model_copy(update={"messages": [{"role": "system", "content": system}]})
            )
        return Session(self, manifest)

    # ---- used by sessions -------------------------------------------------------------------------

    def root_key(self, tenant: str) -> BlockKey:
        return namespace_key(self._hello.fingerprint, self._hello.kv_dtype, self.block_size, tenant)

    def check_open(self) -> None:
        if self._closed:
            raise InvalidInput("the cluster is closed")

    def run(self, request: StepRequest) -> Iterator[list[int] | StepOutcome]:
        """Submit a step and yield its tokens as they come, then its outcome (an error is raised).
        Leaving early (an error, a `break`, a timeout) cancels the step on its engines."""
        controller = self._launcher.controller
        req_id, events = controller.submit(request)
        try:
            while True:
                try:
                    event = events.get(timeout=STEP_TIMEOUT_S)
                except queue.Empty:
                    raise StepTimeout(f"step {req_id} made no progress in {STEP_TIMEOUT_S} s") from None
                if isinstance(event, DualPathError):
                    raise event
                yield event
                if isinstance(event, StepOutcome):
                    return
        finally:
            controller.cancel(req_id)

    def pin(self, session_id: str, keys: Sequence[BlockKey], ttl_s: float) -> None:
        """Pin a session's blocks for `ttl_s`. A store that cannot record the pin (full, down) leaves
        them unprotected from eviction but stored: counted and logged, the step still succeeds."""
        try:
            self.store.pin(session_id, keys, ttl_s)
        except StorageError as exc:
            self._launcher.controller.metrics.pin_failed.inc()
            log.warning("could not pin the blocks of session %s: %s", session_id, exc)

    def metrics(self) -> CollectorRegistry:
        """The cluster's Prometheus registry (steps by outcome, retries, persisted and failed blocks,
        engine restarts): `registry.get_sample_value(name, labels)`, or serve it as text."""
        return self._launcher.controller.metrics.registry

    def decode(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))

    def storage_nic_bytes(self) -> dict[str, tuple[float, float]]:
        """Bytes each node's storage NIC has read and written so far: {node: (read, written)}."""
        return {node: granted_bytes(node) for node in self._launcher.nodes}

    def kill_engine(self, engine_id: str) -> int:
        """SIGKILL one engine process ("pe0", "de0", ...); the cluster retries and respawns it."""
        return self._launcher.kill(engine_id)

    def close(self) -> None:
        """Stop the engines; unfinished steps fail with EngineUnavailable, later calls with InvalidInput.
        Everything persisted stays: sessions resume from it in the next cluster."""
        if self._closed:
            return
        self._closed = True
        self._launcher.close()
        self.store.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
