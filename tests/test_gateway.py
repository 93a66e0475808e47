"""The gateway's sessions API from the outside: statuses and error types, keys and tenants, limits.

The Session API itself runs over the gateway in tests/test_sessions.py (`Cluster.connect`); here
are what only HTTP has: raw bodies, keys, the body limit and the bounded step queue.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import dualpath_sdk as dp
from dualpath_sdk.api.cluster import Cluster
from dualpath_sdk.api.wire import error_from_json, error_json, status_of
from dualpath_sdk.config import EngineConfig
from dualpath_sdk.errors import _kinds
from dualpath_sdk.gateway import Keys, create_app
from dualpath_sdk.gateway.serve import in_thread
from tests.conftest import Pair

KEY_A, KEY_B = "key-of-tenant-a-0123", "key-of-tenant-b-4567"
LIMIT = 64 << 10


@pytest.fixture(scope="module")
def cluster(chat_pair: Pair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    engine = EngineConfig(block_size=16, num_blocks=256)
    store = tmp_path_factory.mktemp("store")
    with Cluster.local(chat_pair.path, storage=store, engine=engine, max_steps=1) as running:
        yield running


@pytest.fixture(scope="module")
def open_url(cluster: Cluster) -> Iterator[str]:
    """A gateway without keys (as on loopback)."""
    with in_thread(create_app(cluster, max_body_bytes=LIMIT)) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_url(cluster: Cluster) -> Iterator[str]:
    with in_thread(create_app(cluster, keys=Keys({KEY_A: "a", KEY_B: "b"}))) as url:
        yield url


def _error(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json()["error"]["type"]


def _hold_a_step(url: str, session_id: str, started: threading.Event, done: threading.Event) -> None:
    """Stream a long step of the session until `done`: the cluster's one step slot stays taken."""
    body = {"token_ids": [5] * 20, "options": {"max_tokens": 2000, "ignore_eos": True}, "stream": True}
    with httpx.stream("POST", f"{url}/v1/sessions/{session_id}/steps", json=body, timeout=60) as response:
        for _ in response.iter_lines():
            started.set()
            if done.is_set():
                return


@pytest.fixture
def held(open_url: str) -> Iterator[str]:
    """A session mid-step (the id), for as long as the test runs."""
    sid = httpx.post(f"{open_url}/v1/sessions", json={}).json()["session_id"]
    started, done = threading.Event(), threading.Event()
    thread = threading.Thread(target=_hold_a_step, args=(open_url, sid, started, done), daemon=True)
    thread.start()
    assert started.wait(30)
    try:
        yield sid
    finally:
        done.set()
        thread.join(30)


def test_bad_requests_get_typed_errors_and_change_nothing(open_url: str) -> None:
    http = httpx.Client(base_url=open_url)
    sid = http.post("/v1/sessions", json={"system": "You are terse."}).json()["session_id"]
    before = http.get(f"/v1/sessions/{sid}").json()
    bad: list[tuple[str, Any]] = [
        ("content", b"{not json"),
        ("json", [1, 2]),
        ("json", {"messages": "hi"}),
        ("json", {"messages": [{"role": "wizard", "content": "x"}]}),
        ("json", {"token_ids": [1], "messages": [{"role": "user", "content": "x"}]}),
        ("json", {"token_ids": [1], "options": {"max_tokens": 8.5}}),
        ("json", {"token_ids": [1], "options": {"temperature": -1}}),
        ("json", {"token_ids": [1], "unknown": 1}),
        ("json", {"token_ids": [1], "options": {"token_ids": [2]}}),
        ("json", {"token_ids": [10**9]}),
    ]
    for kind, body in bad:
        response = http.post(f"/v1/sessions/{sid}/steps", **{kind: body})
        assert _error(response) == (400, "InvalidInput"), (body, response.text)
    assert _error(http.post(f"/v1/sessions/{sid}/steps", json={"token_ids": [1] * 10_000})) == (
        400,
        "ContextTooLong",
    )
    assert http.get(f"/v1/sessions/{sid}").json() == before
    assert _error(http.get("/v1/sessions/no-such-session")) == (404, "SessionNotFound")
    assert _error(http.post("/v1/sessions", json={"session_id": "bad id!"})) == (400, "InvalidInput")
    assert _error(http.post("/v1/sessions", json={"sytem": "typo"})) == (400, "InvalidInput")
    assert _error(http.post("/v1/sessions", json={"ttl_s": "long"})) == (400, "InvalidInput")
    assert _error(http.post("/v1/sessions", json={"session_id": sid})) == (400, "InvalidInput")  # exists


@pytest.mark.parametrize("kind", sorted(_kinds(dp.DualPathError)))
def test_every_error_kind_crosses_http_as_its_class(kind: str) -> None:
    exc = _kinds(dp.DualPathError)[kind]("why")
    status = status_of(exc)
    assert 400 <= status < 600
    back = error_from_json(status, error_json(exc))
    assert type(back) is type(exc) and str(back) == "why"


def test_an_error_body_of_another_shape_is_read_by_its_status() -> None:  # a proxy's, say
    expected = {400: dp.InvalidInput, 404: dp.SessionNotFound, 429: dp.QueueFull, 503: dp.EngineUnavailable}
    for status, cls in expected.items():
        assert type(error_from_json(status, "<html>bad gateway</html>")) is cls
    assert type(error_from_json(502, {"detail": "x"})) is dp.DualPathError


def test_a_step_reports_its_result_and_the_session_its_cache(open_url: str) -> None:
    http = httpx.Client(base_url=open_url, timeout=60)
    sid = http.post("/v1/sessions", json={}).json()["session_id"]
    body = {"token_ids": list(range(1, 41)), "options": {"max_tokens": 4, "ignore_eos": True}}
    first = http.post(f"/v1/sessions/{sid}/steps", json=body).json()
    assert first["result"]["usage"] == {"prompt_tokens": 40, "cached_tokens": 0, "completion_tokens": 4}
    state = http.get(f"/v1/sessions/{sid}").json()
    assert state["token_count"] == 44 == len(state["token_ids"]) == first["session"]["token_count"]
    assert state["cached_tokens"] == 43 and state["cached_blocks"] == 3  # 2 full blocks + the partial
    second = http.post(f"/v1/sessions/{sid}/steps", json={**body, "token_ids": [7]}).json()
    assert second["result"]["usage"]["cached_tokens"] == 43
    child = http.post(f"/v1/sessions/{sid}/fork", json={"at": 1}).json()  # as after the first step
    assert child["token_ids"] == state["token_ids"] and child["parent_id"] == sid
    assert _error(http.post(f"/v1/sessions/{sid}/fork", json={"at": 9})) == (400, "InvalidInput")
    assert sid in http.get("/v1/sessions").json()["data"]
    assert http.delete(f"/v1/sessions/{sid}").json() == {"id": sid, "closed": True}
    assert http.get(f"/v1/sessions/{sid}").status_code == 200  # closed is unpinned, not gone


def test_the_body_limit_is_413_before_and_while_reading(open_url: str) -> None:
    big = b'{"system": "' + b"x" * LIMIT + b'"}'
    assert _error(httpx.post(f"{open_url}/v1/sessions", content=big)) == (413, "RequestTooLarge")

    def chunked() -> Iterator[bytes]:  # no Content-Length: cut off as it arrives
        for i in range(0, len(big), 4096):
            yield big[i : i + 4096]

    assert _error(httpx.post(f"{open_url}/v1/sessions", content=chunked())) == (413, "RequestTooLarge")


def test_a_full_queue_is_429_with_retry_after(open_url: str, held: str) -> None:
    sid = httpx.post(f"{open_url}/v1/sessions", json={}).json()["session_id"]
    response = httpx.post(f"{open_url}/v1/sessions/{sid}/steps", json={"token_ids": [1, 2]}, timeout=30)
    assert _error(response) == (429, "QueueFull") and int(response.headers["Retry-After"]) >= 1
    with dp.Cluster.connect(open_url) as remote, pytest.raises(dp.QueueFull):
        remote.resume(sid).step_tokens([1, 2])
    assert httpx.get(f"{open_url}/v1/sessions/{sid}").json()["token_count"] == 0


def test_a_session_mid_step_is_409_and_a_stale_handle_busy(open_url: str, held: str) -> None:
    response = httpx.post(f"{open_url}/v1/sessions/{held}/steps", json={"token_ids": [1]}, timeout=30)
    assert _error(response) == (409, "SessionBusy")


def test_a_stale_remote_handle_is_session_busy(open_url: str) -> None:
    with dp.Cluster.connect(open_url) as remote:
        one = remote.session()
        other = remote.resume(one.id)
        one.step_tokens([1, 2, 3], max_tokens=2)
        with pytest.raises(dp.SessionBusy):
            other.step_tokens([4], max_tokens=2)
        assert remote.resume(one.id).token_ids == one.token_ids
        with pytest.raises(dp.SessionNotFound):
            remote.resume("no-such-session")


def test_keys_name_tenants_and_tenants_see_only_their_own(keyed_url: str) -> None:
    a = httpx.Client(base_url=keyed_url, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=60)
    b = httpx.Client(base_url=keyed_url, headers={"Authorization": f"Bearer {KEY_B}"}, timeout=60)
    assert _error(httpx.get(f"{keyed_url}/v1/sessions")) == (401, "AuthenticationError")
    wrong = {"Authorization": "Bearer key-of-nobody-000000"}
    assert _error(httpx.get(f"{keyed_url}/v1/sessions", headers=wrong)) == (401, "AuthenticationError")
    assert _error(httpx.get(f"{keyed_url}/metrics")) == (401, "AuthenticationError")
    assert httpx.get(f"{keyed_url}/health").status_code == 200  # liveness needs no key
    created = a.post("/v1/sessions", json={}).json()
    assert created["tenant"] == "a"
    sid = created["session_id"]
    a.post(f"/v1/sessions/{sid}/steps", json={"token_ids": [1, 2, 3], "options": {"max_tokens": 2}})
    assert _error(a.post("/v1/sessions", json={"tenant": "b"})) == (403, "PermissionDenied")
    assert _error(a.get("/v1/sessions", params={"tenant": "b"})) == (403, "PermissionDenied")
    for response in (
        b.get(f"/v1/sessions/{sid}"),
        b.post(f"/v1/sessions/{sid}/steps", json={"token_ids": [4]}),
        b.post(f"/v1/sessions/{sid}/fork", json={}),
        b.delete(f"/v1/sessions/{sid}"),
    ):
        assert _error(response) == (404, "SessionNotFound")
    assert sid in a.get("/v1/sessions").json()["data"] and sid not in b.get("/v1/sessions").json()["data"]
    assert a.get(f"/v1/sessions/{sid}").json()["token_count"] == 5  # b changed nothing
    with (
        dp.Cluster.connect(keyed_url, api_key="key-of-nobody-000000") as nobody,
        pytest.raises(dp.AuthenticationError),
    ):
        nobody.sessions()
    with dp.Cluster.connect(keyed_url, api_key=KEY_B) as remote:
        with pytest.raises(dp.SessionNotFound):
            remote.resume(sid)
        with pytest.raises(dp.PermissionDenied):
            remote.session(tenant="a")
        assert remote.session().tenant == "b"


def test_health_and_metrics(open_url: str, cluster: Cluster) -> None:
    health = httpx.get(f"{open_url}/health")
    assert health.status_code == 200 and health.json()["engines"] == {"pe0": True, "de0": True}
    text = httpx.get(f"{open_url}/metrics").text
    assert "dualpath_steps_total" in text and "dualpath_queue_full_refusals_total" in text
    with dp.Cluster.connect(open_url) as remote:
        assert remote.health() == cluster.health()
        steps = remote.metrics().get_sample_value("dualpath_steps_total", {"outcome": "ok"})
        assert steps == cluster.metrics().get_sample_value("dualpath_steps_total", {"outcome": "ok"})


def test_health_says_which_engines_are_down(chat_pair: Pair, tmp_path: Path) -> None:
    engine = EngineConfig(block_size=16, num_blocks=64)
    with (
        Cluster.local(chat_pair.path, storage=tmp_path / "store", engine=engine) as own,
        in_thread(create_app(own)) as url,
        dp.Cluster.connect(url) as remote,
    ):
        assert remote.health() == {"pe0": True, "de0": True}
        own.close()
        assert httpx.get(f"{url}/health").status_code == 503
        assert remote.health() == {"pe0": False, "de0": False}
