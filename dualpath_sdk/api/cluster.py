"""Cluster: the engine cluster a program embeds (`Cluster.local`, or over Ray: `Cluster.ray`), and the
sessions it serves."""

from __future__ import annotations

import logging
import queue
import secrets
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import anyio.to_thread
from prometheus_client import CollectorRegistry
from pydantic import ValidationError
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from dualpath_sdk.api.flow import ModelFacts
from dualpath_sdk.api.inputs import ResumeOptions, SessionOptions, validated
from dualpath_sdk.api.remote import RemoteCluster
from dualpath_sdk.api.session import LocalSession, Session
from dualpath_sdk.cluster.controller import Controller, Event, StepOutcome, StepRequest
from dualpath_sdk.cluster.launcher import LocalLauncher
from dualpath_sdk.config import ClusterConfig, StoreConfig
from dualpath_sdk.errors import (
    DualPathError,
    EngineUnavailable,
    InvalidInput,
    SessionNotFound,
    StepTimeout,
    StorageError,
)
from dualpath_sdk.fsutil import check_writable
from dualpath_sdk.kv.keys import BlockKey, namespace_key
from dualpath_sdk.model.loader import default_model_dir, resolve_model_dir
from dualpath_sdk.model.spec import ModelSpec
from dualpath_sdk.store import BlockStore, open_store
from dualpath_sdk.store.manifest import Lease, ManifestStore, SessionManifest
from dualpath_sdk.store.prefix import cached_prefix, history_keys

STEP_TIMEOUT_S = 600.0
DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"  # the default model's (ClusterConfig.model None)
log = logging.getLogger(__name__)


class Cluster:
    """Prefill and decode engine processes, their storage tiers, and the sessions on top.

    Use as a context manager (or call `close`): it owns processes and shared memory.
    """

    def __init__(self, config: ClusterConfig, launcher: Launch = LocalLauncher) -> None:
        """`launcher`: starts the engines (this machine's processes; Cluster.ray: Ray's)."""
        self.config = config
        self._closed = True  # until it has started
        path = default_model_dir() if config.model is None else resolve_model_dir(Path(config.model))
        try:
            hf_config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"cannot read the model's config in {path}: {exc}") from None
        spec = ModelSpec.from_hf_config(hf_config)
        tokenizer: PreTrainedTokenizerBase | None = (
            AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
        )
        check_writable(config.store.root)
        self.store: BlockStore = open_store(config.store, node="client")
        self.manifests = ManifestStore(config.store.root / "sessions")
        try:
            self._launcher = launcher(config, str(path))
        except BaseException:
            self.store.close()
            raise
        hello = next(iter(self._launcher.controller.engines.values())).hello
        self.facts = ModelFacts(
            tokenizer=tokenizer,
            vocab_size=spec.vocab_size,
            max_context=spec.max_position,
            block_size=config.engine.block_size,
            mode=config.mode,
            read_plan=config.read_plan,
            root_key=partial(namespace_key, hello.fingerprint, hello.kv_dtype, config.engine.block_size),
        )
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
        return cls(_config(model, prefill_nodes, decode_nodes, storage, overrides))

    @classmethod
    def ray(
        cls,
        address: str | None = None,
        model: str | Path | None = None,
        prefill_nodes: int = 1,
        decode_nodes: int = 1,
        engines_per_node: int = 1,
        storage: str | Path | StoreConfig | None = None,
        **overrides: Any,
    ) -> Cluster:
        """A cluster over a Ray cluster (the `ray` extra): each node's `engines_per_node` engines on
        one Ray node, different nodes on different Ray nodes where there are enough; the controller
        in this process. `address`: the Ray cluster's ("auto", "ray://head:10001"; None: RAY_ADDRESS or
        a new local Ray), unless this process is connected to Ray already. The KV moves over the
        mooncake transport; `storage` must be the same directory on every host (a shared mount), and
        so must the model. Other arguments as `local`'s."""
        if engines_per_node < 1:
            raise InvalidInput(f"engines_per_node must be >= 1, not {engines_per_node}")
        config = _config(model, prefill_nodes, decode_nodes, storage, overrides)
        transfer = config.transfer
        if "backend" in transfer.model_fields_set and transfer.backend != "mooncake":
            raise InvalidInput(f"cluster mode moves KV over the mooncake transport, not {transfer.backend!r}")
        try:
            import ray

            from dualpath_sdk.cluster.ray_launcher import RayLauncher, on_host
        except ImportError as exc:
            raise InvalidInput(
                f"cluster mode needs the ray extra (pip install 'dualpath-sdk[ray]'): {exc}"
            ) from None
        update = {
            "transfer": transfer.model_copy(update={"backend": "mooncake"}),
            "store": on_host(config.store, ray.util.get_node_ip_address()),  # the client's, in this process
        }
        launcher = partial(RayLauncher, address=address, engines_per_node=engines_per_node)
        return cls(config.model_copy(update=update), launcher)

    @staticmethod
    def connect(url: str, api_key: str | None = None, timeout_s: float = STEP_TIMEOUT_S) -> RemoteCluster:
        """The sessions of a cluster behind a gateway (`dualpath serve`), with the same Session API
        over HTTP; `api_key` names the tenant on a gateway with keys."""
        return RemoteCluster(url, api_key=api_key, timeout_s=timeout_s)

    # ---- sessions ---------------------------------------------------------------------------------

    def session(
        self,
        system: str | None = None,
        session_id: str | None = None,
        tenant: str = "default",
        ttl_s: float = 3600.0,
    ) -> Session:
        """A new session of `tenant`. Its id is unguessable unless the caller chooses one, which
        must not exist yet (InvalidInput). Its blocks stay pinned `ttl_s` after each step."""
        o = validated(
            SessionOptions,
            "session",
            {"system": system, "session_id": session_id, "tenant": tenant, "ttl_s": ttl_s},
        )
        self.check_open()
        manifest = self.manifests.new(o.tenant, o.ttl_s, o.session_id or secrets.token_hex(16))
        if o.system is not None:
            manifest = self.manifests.save(
                manifest.model_copy(
                    update={"messages": [{"role": "system", "content": o.system}], "marks": [(1, 0)]}
                ),
                expect_version=manifest.version,
            )
        return LocalSession(self, manifest)

    def resume(self, session_id: str, tenant: str = "default") -> Session:
        """A session as last saved, also after a restart; SessionNotFound when there is none of
        `tenant`'s under that id (another tenant's session is not found either)."""
        o = validated(ResumeOptions, "resume", {"session_id": session_id, "tenant": tenant})
        self.check_open()
        manifest = self.manifests.load(o.session_id)
        if manifest.tenant != o.tenant:
            raise SessionNotFound(f"no session {o.session_id!r}")
        return LocalSession(self, manifest)

    def sessions(self, tenant: str = "default") -> list[str]:
        """The ids of `tenant`'s sessions, oldest first."""
        tenant = validated(ResumeOptions, "sessions", {"session_id": "x", "tenant": tenant}).tenant
        self.check_open()
        mine = [m for m in self.manifests.all() if m.tenant == tenant]
        return [m.session_id for m in sorted(mine, key=lambda m: m.created_at)]

    async def asession(self, **options: Any) -> Session:
        """`session` without blocking the event loop."""
        return await anyio.to_thread.run_sync(partial(self.session, **options))

    async def aresume(self, session_id: str, **options: Any) -> Session:
        return await anyio.to_thread.run_sync(partial(self.resume, session_id, **options))

    async def asessions(self, **options: Any) -> list[str]:
        return await anyio.to_thread.run_sync(partial(self.sessions, **options))

    # ---- the backend sessions step through (api/backend.py) -----------------------------------------

    def check_open(self) -> None:
        if self._closed:
            raise InvalidInput("the cluster is closed")

    def cached_prefix(self, tenant: str, prompt: list[int], history: int) -> tuple[list[BlockKey], int]:
        store = None if self.config.mode == "oracle" else self.store  # oracle: the history counts as cached
        return cached_prefix(store, self.facts.root_key(tenant), prompt, self.facts.block_size, history)

    def submit(self, request: StepRequest) -> _Step:
        return _Step(self._launcher.controller, request)

    def lease(self, session_id: str) -> Lease:
        return self.manifests.lease(session_id)

    def pin(self, session_id: str, keys: Sequence[BlockKey], ttl_s: float) -> None:
        """Pin a session's blocks for `ttl_s`. A store that cannot record the pin (full, down) leaves
        them unprotected from eviction but stored: counted and logged, the step still succeeds."""
        try:
            self.store.pin(session_id, keys, ttl_s)
        except StorageError as exc:
            self._launcher.controller.metrics.pin_failed.inc()
            log.warning("could not pin the blocks of session %s: %s", session_id, exc)

    def unpin(self, session_id: str) -> None:
        self.store.unpin(session_id)

    def fork(self, manifest: SessionManifest, at: tuple[int, int] | None = None) -> SessionManifest:
        root, bs = self.facts.root_key(manifest.tenant), self.facts.block_size
        return self.manifests.fork(
            manifest.session_id,
            secrets.token_hex(16),
            blocks=self.store,
            at=at,
            keys_of=lambda tokens: history_keys(root, tokens, bs),
        )

    # ---- operating it ----------------------------------------------------------------------------

    @property
    def model_id(self) -> str:
        """The served model's name: its directory's (or GGUF file's), as `/v1/models` lists it."""
        model = self.config.model
        return DEFAULT_MODEL_ID if model is None else Path(model).name.removesuffix(".gguf")

    @property
    def max_context(self) -> int:
        """The model's context window in tokens (prompt and reply together)."""
        return self.facts.max_context

    def metrics(self) -> CollectorRegistry:
        """The cluster's Prometheus registry (steps by outcome, retries, persisted and failed blocks,
        engine restarts): `registry.get_sample_value(name, labels)`, or serve it as text."""
        return self._launcher.controller.metrics.registry

    def storage_nic_bytes(self) -> dict[str, tuple[float, float]]:
        """Bytes each node's storage NIC has read and written so far: {node: (read, written)}."""
        return self._launcher.storage_nic_bytes()

    def health(self) -> dict[str, bool]:
        """Whether each engine ("pe0", "de0", ...) is up now (none once the cluster is closed)."""
        alive = {} if self._closed else self._launcher.controller.last_seen()
        return {spec.engine_id: spec.engine_id in alive for spec in self._launcher.specs}

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


Launch = Callable[[ClusterConfig, str], LocalLauncher]


def _config(
    model: str | Path | None,
    prefill_nodes: int,
    decode_nodes: int,
    storage: str | Path | StoreConfig | None,
    overrides: dict[str, Any],
) -> ClusterConfig:
    if storage is not None and "store" in overrides:
        raise InvalidInput("give the store as storage= or as store=, not both")
    store = overrides.pop("store", storage)
    if isinstance(store, (str, Path)):
        store = {"root": Path(store)}
    try:
        return ClusterConfig.model_validate(
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


class _Step:
    """A step submitted to the controller (api/backend.py's StepHandle)."""

    def __init__(self, controller: Controller, request: StepRequest) -> None:
        self._controller = controller
        self.req_id, self._events = controller.submit(request)

    def receive(self) -> list[int] | StepOutcome:
        try:
            event = self._events.get(timeout=STEP_TIMEOUT_S)
        except queue.Empty:
            raise StepTimeout(f"step {self.req_id} made no progress in {STEP_TIMEOUT_S} s") from None
        if isinstance(event, DualPathError):
            raise event
        return event

    async def areceive(self) -> list[int] | StepOutcome:
        try:
            event = self._events.get_nowait()
        except queue.Empty:  # wait in a worker thread; a cancelled wait is woken by cancel()
            event = await anyio.to_thread.run_sync(self._get, abandon_on_cancel=True)
        if isinstance(event, DualPathError):
            raise event
        return event

    def _get(self) -> Event:
        try:
            return self._events.get(timeout=STEP_TIMEOUT_S)
        except queue.Empty:
            return StepTimeout(f"step {self.req_id} made no progress in {STEP_TIMEOUT_S} s")

    def stop(self) -> None:
        self._controller.stop(self.req_id)

    def cancel(self) -> None:
        self._controller.cancel(self.req_id)
        self._events.put(EngineUnavailable("the step was cancelled"))  # wakes an abandoned wait
