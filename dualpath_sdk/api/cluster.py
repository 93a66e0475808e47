"""Cluster: the engine cluster a program embeds (`Cluster.local`), and the sessions it serves."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from dualpath_sdk.api.session import Session
from dualpath_sdk.cluster.controller import StepRequest
from dualpath_sdk.cluster.launcher import LocalLauncher
from dualpath_sdk.config import ClusterConfig, StoreConfig
from dualpath_sdk.errors import DualPathError, InvalidInput
from dualpath_sdk.kv.keys import BlockKey, namespace_key
from dualpath_sdk.model.loader import default_model_dir, resolve_model_dir
from dualpath_sdk.model.spec import ModelSpec
from dualpath_sdk.store import BlockStore, open_store
from dualpath_sdk.store.limiter import granted_bytes
from dualpath_sdk.store.manifest import ManifestStore

STEP_TIMEOUT_S = 600.0


class Cluster:
    """Prefill and decode engine processes, their storage tiers, and the sessions on top.

    Use as a context manager (or call `close`): it owns processes and shared memory.
    """

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        path = default_model_dir() if config.model is None else resolve_model_dir(Path(config.model))
        hf_config = AutoConfig.from_pretrained(path)
        spec = ModelSpec.from_hf_config(hf_config)
        self.vocab_size = spec.vocab_size
        self.max_context = spec.max_position
        self.block_size = config.engine.block_size
        self.tokenizer: PreTrainedTokenizerBase | None = (
            AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
        )
        self.store: BlockStore = open_store(config.store, node="client")
        self.manifests = ManifestStore(config.store.root / "sessions")
        self._launcher = LocalLauncher(config, str(path))
        self._hello = next(iter(self._launcher.controller.engines.values())).hello

    @classmethod
    def local(
        cls,
        model: str | Path | None = None,
        prefill_nodes: int = 1,
        decode_nodes: int = 1,
        storage: str | Path | None = None,
        **overrides: Any,
    ) -> Cluster:
        """An embedded cluster on this machine: one engine process per node."""
        try:
            store = StoreConfig(root=Path(storage)) if storage is not None else StoreConfig()
            config = ClusterConfig(
                model=None if model is None else str(model),
                prefill_nodes=prefill_nodes,
                decode_nodes=decode_nodes,
                store=store,
                **overrides,
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

    def run(self, request: StepRequest) -> Iterator[tuple[str, object]]:
        """Submit a step and yield its events until it ends (an error is raised)."""
        controller = self._launcher.controller
        req_id, events = controller.submit(request)
        try:
            while True:
                try:
                    kind, payload = events.get(timeout=STEP_TIMEOUT_S)
                except queue.Empty:
                    raise DualPathError(f"step {req_id} made no progress in {STEP_TIMEOUT_S} s") from None
                if kind == "error":
                    assert isinstance(payload, Exception)
                    raise payload
                yield kind, payload
                if kind == "done":
                    return
        finally:
            controller.cancel(req_id)

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
        self._launcher.close()
        self.store.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
