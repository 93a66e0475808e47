"""A cluster starts from wherever a program runs: engines are `python -m dualpath_sdk.engine`.

A multiprocessing spawn re-imports the user's `__main__`, so it failed for a script without a main
guard, for `python -c`, for a script on stdin, a REPL and a notebook kernel. Each form below starts
a real cluster (real engine processes, a tiny model) in a subprocess and steps one session. An
engine that cannot start says why, in the EngineUnavailable raised; one whose program is killed
does not outlive it.
"""

from __future__ import annotations

import ast
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import safetensors.torch

from dualpath_sdk.api.cluster import Cluster
from dualpath_sdk.config import EngineConfig
from dualpath_sdk.errors import EngineUnavailable
from tests.conftest import TINY_CONFIGS, Pair, _pair, hf_greedy

PROMPT = [1, 2, 3, 4, 5]
NEW_TOKENS = 4
TIMEOUT_S = 240

# No main guard, on purpose. One statement a line: a REPL reads it as it is.
SCRIPT = """\
from dualpath_sdk import Cluster, EngineConfig
overrides = dict(engine=EngineConfig(block_size=16, num_blocks=256), buffer_slots=64)
cluster = Cluster.local(model={model!r}, storage={storage!r}, **overrides)
result = cluster.session().step_tokens({prompt!r}, max_tokens={n}, ignore_eos=True)
print("TOKENS", result.token_ids, flush=True)
cluster.close()
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    return _pair(tmp_path_factory.mktemp("llama"), TINY_CONFIGS["llama"])


@pytest.fixture(scope="module")
def expected(tiny: Pair) -> list[int]:
    return hf_greedy(tiny, PROMPT, NEW_TOKENS)


@pytest.fixture
def script(tiny: Pair, tmp_path: Path) -> str:
    return SCRIPT.format(model=str(tiny.path), storage=str(tmp_path / "store"), prompt=PROMPT, n=NEW_TOKENS)


def _tokens(stdout: str) -> list[int]:
    lines = [line for line in stdout.splitlines() if line.startswith("TOKENS ")]
    assert len(lines) == 1, f"no TOKENS line in {stdout!r}"
    return list(ast.literal_eval(lines[0].removeprefix("TOKENS ")))


def _run(args: list[str], cwd: Path, stdin: str | None = None) -> list[int]:
    """Run a Python program that starts a cluster (from a directory of its own, not the repo's)."""
    done = subprocess.run(
        [sys.executable, *args], input=stdin, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=cwd
    )
    assert done.returncode == 0, f"exit code {done.returncode}; stderr:\n{done.stderr[-4000:]}"
    return _tokens(done.stdout)


def test_a_script_without_a_main_guard(script: str, tmp_path: Path, expected: list[int]) -> None:
    path = tmp_path / "agent.py"
    path.write_text(script)
    assert _run([str(path)], tmp_path) == expected


def test_python_dash_c(script: str, tmp_path: Path, expected: list[int]) -> None:
    assert _run(["-c", script], tmp_path) == expected


def test_a_script_on_stdin(script: str, tmp_path: Path, expected: list[int]) -> None:
    assert _run(["-"], tmp_path, stdin=script) == expected


def test_an_interactive_interpreter_fed_on_stdin(script: str, tmp_path: Path, expected: list[int]) -> None:
    assert _run(["-i"], tmp_path, stdin=script) == expected


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[object]:
    """A Jupyter kernel of this very interpreter, and a client connected to it."""
    pytest.importorskip("ipykernel", reason="ipykernel is not installed (the test extra has it)")
    jupyter_client = pytest.importorskip("jupyter_client", reason="jupyter_client is not installed")
    from jupyter_client.kernelspec import KernelSpecManager

    spec_dir = tmp_path / "kernels" / "here"
    spec_dir.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec = {"argv": argv, "display_name": "here", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(spec_dir.parent)])
    manager = jupyter_client.KernelManager(kernel_name="here", kernel_spec_manager=specs)
    manager.start_kernel(cwd=str(tmp_path))
    client = manager.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=120)
        yield client
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=False)
        assert not manager.is_alive()


def test_a_jupyter_kernel(kernel: object, script: str, expected: list[int]) -> None:
    out: list[str] = []

    def on_output(message: dict[str, object]) -> None:
        content = message["content"]
        if message["header"]["msg_type"] == "stream" and content["name"] == "stdout":  # type: ignore[index]
            out.append(content["text"])  # type: ignore[index]

    reply = kernel.execute_interactive(script, timeout=TIMEOUT_S, output_hook=on_output)  # type: ignore[attr-defined]
    assert reply["content"]["status"] == "ok", reply["content"]
    assert _tokens("".join(out)) == expected


def test_an_engine_that_cannot_load_its_model_says_why(tiny: Pair, tmp_path: Path) -> None:
    # A bad path fails in the caller, before any engine starts; so: a valid config, corrupt weights.
    with pytest.raises(Exception, match="neither an HF model directory"):
        Cluster.local(model="/nonexistent", storage=tmp_path / "store")
    bad = tmp_path / "bad-model"
    bad.mkdir()
    shutil.copy(tiny.path / "config.json", bad / "config.json")
    (bad / "model.safetensors").write_bytes((tiny.path / "model.safetensors").read_bytes()[:100])
    with pytest.raises(Exception) as loading:
        safetensors.torch.load_file(bad / "model.safetensors")
    engine_error = str(loading.value)
    assert engine_error
    with pytest.raises(EngineUnavailable) as started:
        Cluster.local(
            model=bad, storage=tmp_path / "store", engine=EngineConfig(block_size=16, num_blocks=256)
        )
    message = str(started.value)
    assert "exited while starting" in message
    assert engine_error in message, message  # the engine's own exception, from its stderr


# The cluster starts in a thread that ends (a pool's worker, say): its engines must live on, as long
# as the program and no longer.
KILLED_SCRIPT = """\
import os, signal, threading, time
from dualpath_sdk import Cluster, EngineConfig
clusters = []
overrides = dict(engine=EngineConfig(block_size=16, num_blocks=256), buffer_slots=64)
start = lambda: clusters.append(Cluster.local(model={model!r}, storage={storage!r}, **overrides))
starter = threading.Thread(target=start)
starter.start()
starter.join()
time.sleep(1.0)
cluster = clusters[0]
result = cluster.session().step_tokens({prompt!r}, max_tokens={n}, ignore_eos=True)
print("TOKENS", result.token_ids, flush=True)
print("PIDS", [p.pid for p in cluster._launcher.processes.values()], flush=True)
print("NODES", cluster._launcher.nodes, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")  # a zombie waits for its reaper: it runs no more


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_engines_outlive_the_thread_that_started_them_but_not_a_killed_program(
    tiny: Pair, tmp_path: Path, expected: list[int]
) -> None:
    code = KILLED_SCRIPT.format(
        model=str(tiny.path), storage=str(tmp_path / "store"), prompt=PROMPT, n=NEW_TOKENS
    )
    with (tmp_path / "out").open("w+") as out:  # a file, not a pipe: the engines hold our stdout too
        done = subprocess.run([sys.executable, "-c", code], stdout=out, timeout=TIMEOUT_S, cwd=tmp_path)
        out.seek(0)
        stdout = out.read()
    assert done.returncode == -signal.SIGKILL
    assert _tokens(stdout) == expected
    (line,) = [line for line in stdout.splitlines() if line.startswith("PIDS ")]
    pids = ast.literal_eval(line.removeprefix("PIDS "))
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    while not all(_gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(pid) for pid in pids), f"engines {pids} outlived their program"
    (line,) = [line for line in stdout.splitlines() if line.startswith("NODES ")]
    leftovers = [f"dualpath-xfer-{pid}-*" for pid in pids]  # what the killed cluster left behind
    leftovers += [f"dualpath-*-{node}" for node in ast.literal_eval(line.removeprefix("NODES "))]
    for pattern in leftovers:
        for path in Path("/dev/shm").glob(pattern):
            path.unlink(missing_ok=True)
