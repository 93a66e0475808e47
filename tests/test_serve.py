"""`dualpath serve` as a real process on a tiny model: it refuses an address off loopback without
keys before any engine starts, binds only the address given, checks keys, and stops cleanly on
SIGTERM (exit 0) with a step in flight: cancelled past the grace, the session left as before it and
resumable after a restart; finished within the grace, the step's result reaches the client."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from dualpath_sdk.cli import app
from dualpath_sdk.errors import InvalidInput
from dualpath_sdk.gateway.auth import Keys
from dualpath_sdk.gateway.serve import check_exposure
from dualpath_sdk.store.manifest import ManifestStore
from tests.conftest import Pair

ROOT = Path(__file__).resolve().parent.parent
KEY = "test-key-default-0001"
ACME_KEY = "test-key-acme-000002"
START_S = 90.0  # engines and the gateway up (a loaded machine)
EXIT_S = 30.0  # SIGTERM to exit: the grace, cancelling, closing the cluster
LONG_TEXT = " ".join(f"line {i}: the build failed at step {i} with exit code {i % 7}" for i in range(24))


@dataclass
class Served:
    proc: subprocess.Popen[str]
    url: str
    port: int
    output: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "".join(self.output)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DUALPATH_API_KEY"}
    return {**env, "COLUMNS": "200", **extra}


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dualpath_sdk.cli", "serve", *args]


@contextmanager
def serving(*args: str) -> Iterator[Served]:
    """`dualpath serve --port 0 ARGS` until the block ends (then killed, if still running); yields once
    it printed its URL and /health answers."""
    proc = subprocess.Popen(
        _command("--port", "0", *args),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    reader = threading.Thread(target=_read, args=(proc, output), daemon=True)
    reader.start()
    try:
        served = _started(proc, output)
        yield served
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        reader.join(10)


def _read(proc: subprocess.Popen[str], output: list[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        output.append(line)


def _started(proc: subprocess.Popen[str], output: list[str]) -> Served:
    deadline = time.monotonic() + START_S
    url = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"serve exited with {proc.returncode} before it listened:\n{''.join(output)}")
        if url is None:
            found = re.search(r"listening on (http://\S+)", "".join(output))
            url = found.group(1) if found else None
        if url is not None:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    return Served(proc, url, int(url.rsplit(":", 1)[1]), output)
            except httpx.TransportError:
                pass
        time.sleep(0.2)
    pytest.fail(f"serve did not become healthy in {START_S} s:\n{''.join(output)}")


def _exits_cleanly(served: Served) -> None:
    try:
        code = served.proc.wait(EXIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"serve did not exit within {EXIT_S} s of SIGTERM:\n{served.text()}")
    assert code == 0, served.text()
    assert "the gateway stopped, the cluster is closed" in served.text()


def _listeners(port: int) -> set[str]:
    """The addresses any process listens on at TCP `port` (IPv4 dotted, IPv6 as the kernel's hex)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                ipv4 = ".".join(str(b) for b in reversed(bytes.fromhex(address)))
                found.add(ipv4 if len(address) == 8 else address)
    return found


def _events(response: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    """A streamed step's server-sent events: (event, data)."""
    event = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: ") and event is not None:
            yield event, json.loads(line.removeprefix("data: "))
            event = None


# ---- refusing to start ------------------------------------------------------------------------------


def test_off_loopback_without_keys_refuses_before_any_engine(tmp_path: Path) -> None:
    storage = tmp_path / "store"
    started = time.monotonic()
    done = subprocess.run(
        _command("--host", "0.0.0.0", "--model", str(tmp_path / "no-model"), "--storage", str(storage)),
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    text = " ".join((done.stdout + done.stderr).split())
    assert done.returncode != 0, text
    assert "refusing to serve on '0.0.0.0' without API keys" in text
    assert "--api-key" in text and "loopback" in text
    # before any engine: the model was not even looked for, the store not created
    assert "model's config" not in text
    assert not storage.exists()
    assert time.monotonic() - started < 45


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7", "example.com", ""])
def test_every_address_off_loopback_needs_keys(host: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["serve", "--host", host, "--storage", str(tmp_path / "s")], env=_env())
    assert result.exit_code == 1
    assert "without API keys" in " ".join(result.output.split())
    assert not (tmp_path / "s").exists()


def test_loopback_needs_no_keys_and_keys_allow_any_address() -> None:
    for host in ("127.0.0.1", "::1", "localhost", "LOCALHOST", "127.0.0.2"):
        check_exposure(host, None)
    check_exposure("0.0.0.0", Keys({KEY: "default"}))
    with pytest.raises(InvalidInput):
        check_exposure("0.0.0.0", None)


def test_api_key_from_the_environment_is_checked_before_start(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["serve", "--host", "0.0.0.0", "--storage", str(tmp_path / "s")],
        env=_env(DUALPATH_API_KEY="too-short"),
    )
    assert result.exit_code == 1
    assert "at least 16 characters" in result.output  # the key was read, and refused
    assert not (tmp_path / "s").exists()


# ---- keys -------------------------------------------------------------------------------------------


def test_api_keys_are_required_and_bind_only_loopback(chat_pair: Pair, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps({ACME_KEY: "acme"}))
    args = ["--model", str(chat_pair.path), "--storage", str(tmp_path / "store")]
    with serving(*args, "--api-key", KEY, "--keys-file", str(keys_file)) as served:
        assert _listeners(served.port) == {"127.0.0.1"}  # not 0.0.0.0, not [::]
        with served.client() as client:
            anonymous = client.post("/v1/sessions", json={})
            assert anonymous.status_code == 401
            assert anonymous.json()["error"]["type"] == "AuthenticationError"
            wrong = client.post("/v1/sessions", json={}, headers={"Authorization": f"Bearer {KEY}x"})
            assert wrong.status_code == 401
            assert client.get("/metrics").status_code == 401

            mine = {"Authorization": f"Bearer {KEY}"}
            created = client.post("/v1/sessions", json={"system": "Be terse."}, headers=mine)
            assert created.status_code == 201 and created.json()["tenant"] == "default"
            sid = created.json()["session_id"]
            body = {"messages": [{"role": "user", "content": "hi"}], "options": {"max_tokens": 4}}
            stepped = client.post(f"/v1/sessions/{sid}/steps", json=body, headers=mine)
            assert stepped.status_code == 200, stepped.text
            assert stepped.json()["result"]["usage"]["completion_tokens"] == 4
            assert client.get("/metrics", headers=mine).status_code == 200

            acme = {"Authorization": f"Bearer {ACME_KEY}"}  # the keys file's tenant: not default's session
            assert client.get(f"/v1/sessions/{sid}", headers=acme).status_code == 404
            assert client.get("/v1/sessions", headers=acme).json()["data"] == []


# ---- SIGTERM ----------------------------------------------------------------------------------------


def test_sigterm_mid_step_exits_0_and_the_session_resumes(chat_pair: Pair, tmp_path: Path) -> None:
    storage = tmp_path / "store"
    args = ["--model", str(chat_pair.path), "--storage", str(storage)]

    # grace 0: the in-flight step (1500 tokens: seconds of decoding) is cancelled at once
    with serving(*args, "--graceful-s", "0") as served, served.client() as client:
        sid = client.post("/v1/sessions", json={"system": "You fix builds."}).json()["session_id"]
        first = {"messages": [{"role": "user", "content": LONG_TEXT}], "options": {"max_tokens": 4}}
        before = client.post(f"/v1/sessions/{sid}/steps", json=first).json()["session"]
        assert before["token_count"] > 64  # whole blocks were persisted: the next steps load them

        long_step = {
            "messages": [{"role": "user", "content": "Explain every line."}],
            "options": {"max_tokens": 1500, "ignore_eos": True},
            "stream": True,
        }
        seen: list[str] = []
        try:
            with client.stream("POST", f"/v1/sessions/{sid}/steps", json=long_step) as response:
                assert response.status_code == 200
                for event, _ in _events(response):
                    if not seen:
                        served.proc.send_signal(signal.SIGTERM)
                    seen.append(event)
        except httpx.TransportError:
            pass  # the server cut the cancelled response short
        assert seen and seen[0] == "chunk"
        assert "result" not in seen and len(seen) < 1500
        _exits_cleanly(served)
    # the cancelled step left the session exactly as before it
    assert ManifestStore(storage / "sessions").load(sid).token_ids == before["token_ids"]

    # a restart on the same storage: the session resumes; a step within the grace finishes
    with serving(*args, "--graceful-s", "30") as served, served.client() as client:
        resumed = client.get(f"/v1/sessions/{sid}").json()
        assert resumed["token_count"] == before["token_count"]
        assert resumed["messages"] == before["messages"] and resumed["version"] == before["version"]
        assert resumed["cached_tokens"] > 0

        next_step = {
            "messages": [{"role": "user", "content": "Now the fix."}],
            "options": {"max_tokens": 300, "ignore_eos": True},
            "stream": True,
        }
        seen, result = [], None
        with client.stream("POST", f"/v1/sessions/{sid}/steps", json=next_step) as response:
            assert response.status_code == 200
            for event, data in _events(response):
                if not seen:
                    served.proc.send_signal(signal.SIGTERM)
                seen.append(event)
                if event == "result":
                    result = data
        assert result is not None, seen
        assert result["result"]["usage"]["cached_tokens"] > 0
        assert result["result"]["usage"]["completion_tokens"] == 300
        after = result["session"]
        assert after["token_count"] > before["token_count"] + 300
        _exits_cleanly(served)
    assert ManifestStore(storage / "sessions").load(sid).token_ids == after["token_ids"]
