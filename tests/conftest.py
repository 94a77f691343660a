"""Shared fixtures. MNIST comes from the verified data dir (`make test` runs `trainer data` first);
every test that tracks gets its own temporary sqlite store and experiment."""

import pytest
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
