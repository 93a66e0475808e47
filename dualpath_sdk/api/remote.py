"""`Cluster.connect(url)`: the session API of a cluster behind a gateway (`dualpath serve`), over httpx.

A `RemoteSession` has every face of a local one; each step is one request to the gateway's sessions
API, streamed as server-sent events, and the gateway's errors are raised as the same classes
(api/wire.py). The session's state (its token ids, messages, version) is mirrored from the
gateway's answers, and every step sends the version it expects, so a stale handle gets SessionBusy
as a stale local handle does.

An httpx AsyncClient's connections belong to the event loop that opened them, and one connected
cluster serves any loop (asyncio, trio, one after another): each async step opens its own client,
which costs about a millisecond with the SSL context made once here.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncGenerator, Iterator, Mapping
from functools import partial
from typing import Any

import anyio.to_thread
import httpx
from httpx_sse import ServerSentEvent, aconnect_sse, connect_sse
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from dualpath_sdk.api.inputs import ResumeOptions, SessionOptions, validated
from dualpath_sdk.api.result import StepChunk, StepResult
from dualpath_sdk.api.session import CheckedTurn, Session
from dualpath_sdk.api.wire import (
    CHUNK,
    ERROR,
    RESULT,
    chunk_from_json,
    error_from_json,
    result_from_json,
    session_from_json,
)
from dualpath_sdk.errors import EngineUnavailable, InvalidInput, StepTimeout
from dualpath_sdk.store.manifest import SessionManifest

STEP_TIMEOUT_S = 600.0  # the longest wait for a step's next event, as in a local cluster


class RemoteCluster:
    """A gateway's sessions. `tenant=None` (the default everywhere): the API key's tenant, or
    "default" on a gateway without keys. Use as a context manager (or call `close`)."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = STEP_TIMEOUT_S) -> None:
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = httpx.Timeout(timeout_s, connect=10.0)
        self._ssl = ssl.create_default_context()
        self.http = httpx.Client(
            base_url=self.url, headers=self._headers, timeout=self._timeout, verify=self._ssl
        )
        self._closed = False
        self._served: dict[str, Any] | None = None

    # ---- sessions ---------------------------------------------------------------------------------

    def session(
        self,
        system: str | None = None,
        session_id: str | None = None,
        tenant: str | None = None,
        ttl_s: float = 3600.0,
    ) -> RemoteSession:
        """A new session (as `Cluster.session`)."""
        o = validated(
            SessionOptions,
            "session",
            {"system": system, "session_id": session_id, "tenant": tenant or "default", "ttl_s": ttl_s},
        )
        body = {**o.model_dump(exclude={"tenant"}), **({"tenant": tenant} if tenant else {})}
        return RemoteSession(self, session_from_json(self.request("POST", "/v1/sessions", json=body)))

    def resume(self, session_id: str, tenant: str | None = None) -> RemoteSession:
        """A session as last saved; SessionNotFound when the tenant has none under that id."""
        o = validated(ResumeOptions, "resume", {"session_id": session_id, "tenant": tenant or "default"})
        data = self.request("GET", f"/v1/sessions/{o.session_id}", params=_tenant(tenant))
        return RemoteSession(self, session_from_json(data))

    def sessions(self, tenant: str | None = None) -> list[str]:
        """The ids of the tenant's sessions, oldest first."""
        ids: list[str] = self.request("GET", "/v1/sessions", params=_tenant(tenant))["data"]
        return ids

    async def asession(self, **options: Any) -> RemoteSession:
        """`session` without blocking the event loop."""
        return await anyio.to_thread.run_sync(partial(self.session, **options))

    async def aresume(self, session_id: str, **options: Any) -> RemoteSession:
        return await anyio.to_thread.run_sync(partial(self.resume, session_id, **options))

    async def asessions(self, **options: Any) -> list[str]:
        return await anyio.to_thread.run_sync(partial(self.sessions, **options))

    # ---- operating it ----------------------------------------------------------------------------

    @property
    def model_id(self) -> str:
        """The served model's name, as the gateway's `/v1/models` lists it (asked once)."""
        return str(self._model()["id"])

    @property
    def max_context(self) -> int:
        """The model's context window in tokens."""
        return int(self._model()["max_model_len"])

    def _model(self) -> dict[str, Any]:
        if self._served is None:
            self._served = dict(self.request("GET", "/v1/models")["data"][0])
        return self._served

    def health(self) -> dict[str, bool]:
        """Whether each engine is up (as `Cluster.health`); a gateway with an engine down answers
        503 with the same body, which is an answer here, not an error."""
        response = self._send("GET", "/health", healthy=(503,))
        engines: dict[str, bool] = response.json().get("engines", {})
        return engines

    def metrics(self) -> CollectorRegistry:
        """A snapshot of the gateway's metrics, as a registry (`get_sample_value` works as on a
        local cluster's)."""
        families = list(text_string_to_metric_families(self._send("GET", "/metrics").text))
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Snapshot(families))
        return registry

    def close(self) -> None:
        """Close the connection (the gateway's sessions stay); later calls raise InvalidInput."""
        self._closed = True
        self.http.close()

    def __enter__(self) -> RemoteCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the wire -------------------------------------------------------------------------------

    def check_open(self) -> None:
        if self._closed:
            raise InvalidInput("the connection to the gateway is closed")

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One JSON request; the gateway's error raised as its class."""
        return self._send(method, path, **kwargs).json()

    def _send(self, method: str, path: str, healthy: tuple[int, ...] = (), **kwargs: Any) -> httpx.Response:
        self.check_open()
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise StepTimeout(f"the gateway at {self.url} did not answer: {exc}") from None
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"cannot reach the gateway at {self.url}: {exc}") from None
        if response.is_error and response.status_code not in healthy:
            raise _error(response)
        return response

    def async_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url, headers=self._headers, timeout=self._timeout, verify=self._ssl
        )


class RemoteSession(Session):
    """A session of a gateway's cluster: the faces of `Session`, each step one HTTP request."""

    def __init__(self, cluster: RemoteCluster, manifest: SessionManifest) -> None:
        super().__init__(manifest)
        self._cluster = cluster

    def _run(self, turn: CheckedTurn) -> Iterator[StepChunk | StepResult]:
        self._check_open()
        try:
            with connect_sse(self._cluster.http, "POST", self._steps, json=self._body(turn)) as source:
                if source.response.is_error:
                    source.response.read()
                    raise _error(source.response)
                yield from self._read(source.iter_sse())
        except httpx.TimeoutException as exc:
            raise StepTimeout(f"the step made no progress: {exc}") from None
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"the step's connection to the gateway failed: {exc}") from None

    async def _arun(self, turn: CheckedTurn) -> AsyncGenerator[StepChunk | StepResult, None]:
        self._check_open()
        try:
            async with (
                self._cluster.async_client() as http,
                aconnect_sse(http, "POST", self._steps, json=self._body(turn)) as source,
            ):
                if source.response.is_error:
                    await source.response.aread()
                    raise _error(source.response)
                async for event in source.aiter_sse():
                    item = self._event(event)
                    yield item
                    if isinstance(item, StepResult):
                        return
        except httpx.TimeoutException as exc:
            raise StepTimeout(f"the step made no progress: {exc}") from None
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"the step's connection to the gateway failed: {exc}") from None
        raise EngineUnavailable("the gateway ended the step's stream before its result")

    def _read(self, events: Iterator[ServerSentEvent]) -> Iterator[StepChunk | StepResult]:
        for event in events:
            item = self._event(event)
            yield item
            if isinstance(item, StepResult):
                return
        raise EngineUnavailable("the gateway ended the step's stream before its result")

    def _event(self, event: ServerSentEvent) -> StepChunk | StepResult:
        data = event.json()
        if event.event == CHUNK:
            return chunk_from_json(data)
        if event.event == RESULT:
            self._manifest = session_from_json(data["session"])
            return result_from_json(data["result"])
        if event.event == ERROR:
            raise error_from_json(500, data)
        raise EngineUnavailable(f"the gateway sent an unknown event {event.event!r}")

    def _fork(self, at: tuple[int, int] | None) -> Session:
        index = None if at is None else self._manifest.marks.index(at)
        data = self._cluster.request("POST", f"{self._path}/fork", json={"at": index}, params=self._tenant)
        return RemoteSession(self._cluster, session_from_json(data))

    def _close(self) -> None:
        self._cluster.request("DELETE", self._path, params=self._tenant)

    def _check_cluster(self) -> None:
        self._cluster.check_open()

    def _body(self, turn: CheckedTurn) -> dict[str, Any]:
        what = {"messages": turn.messages} if turn.token_ids is None else {"token_ids": turn.token_ids}
        options = turn.options.model_dump(exclude_defaults=True)
        return {**what, "options": options, "stream": True, "expect_version": self.version}

    @property
    def _path(self) -> str:
        return f"/v1/sessions/{self.id}"

    @property
    def _steps(self) -> str:
        return f"{self._path}/steps?{httpx.QueryParams(self._tenant)}"

    @property
    def _tenant(self) -> dict[str, str]:
        return {"tenant": self.tenant}


def _error(response: httpx.Response) -> Exception:
    try:
        body = response.json()
    except ValueError:
        body = response.text
    return error_from_json(response.status_code, body)


def _tenant(tenant: str | None) -> Mapping[str, str]:
    return {"tenant": tenant} if tenant else {}


class _Snapshot:
    """A collector that yields metric families read from the text format."""

    def __init__(self, families: list[Any]) -> None:
        self._families = families

    def collect(self) -> list[Any]:
        return self._families
