"""Shared fixtures. MNIST comes from the verified data dir (`make test` runs `trainer data` first);
every test that tracks gets its own temporary sqlite store and experiment."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from trainer.cli import cli
from trainer.data import default_data_dir, ensure_mnist


@pytest.fixture(scope="session")
def data_dir():
    ensure_mnist(default_data_dir())
    return default_data_dir()


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh tracking store for this test; returns its URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tests")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    return uri


@pytest.fixture
def run_cli():
    """Invoke the `trainer` CLI in-process; returns click's Result."""

    def run(*args):
        return CliRunner().invoke(cli, [str(a) for a in args])

    return run


def answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).ok
    except requests.ConnectionError:
        return False


@pytest.fixture(scope="session")
def http_server():
    """`with http_server(cmd, env) as url:` runs `cmd --host 127.0.0.1 --port <free port>` (an mlflow
    server) with the venv's bin first on PATH, waits for its /health, and stops its process group after."""

    @contextmanager
    def serve(cmd: list, env: dict, timeout: float = 180):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, **env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        cmd = [*map(str, cmd), "--host", "127.0.0.1", "--port", str(port)]
        with tempfile.TemporaryFile() as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True)
            url = f"http://127.0.0.1:{port}"
            try:
                deadline = time.monotonic() + timeout
                while not answers(f"{url}/health"):
                    if proc.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        pytest.fail(f"{cmd[:3]} did not start: {log.read().decode()[-3000:]}")
                    time.sleep(0.5)
                yield url
            finally:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()

    return serve
