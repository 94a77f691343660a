"""The tracking store: which one (MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME), whether it can be used,
and its first-touch set-up. Every failure to use it is one line (StoreError), before any training.

Defaults: the local sqlite file `mlflow.db` (artifacts in `mlruns/` beside it) and experiment `mnist8k`.
"""

import fcntl
import importlib
import logging
import os
from contextlib import contextmanager
from pathlib import Path

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "mnist8k"
DRIVERS = {"postgresql": "psycopg2", "mysql": "pymysql", "mssql": "pyodbc"}  # SQL stores: the driver MLflow needs


class StoreError(ValueError):
    """The tracking store cannot be used; the message says why in one line."""


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)


def sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def exists() -> bool:
    """Whether the store is there to read (a sqlite file that exists, or any other URI): reading a
    missing sqlite store would create it."""
    path = sqlite_path(tracking_uri())
    return path is None or path.is_file()


def check(uri: str) -> None:
    """The URI's form, its driver and (sqlite) its folder, without touching the store."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0]
    if scheme == "sqlite" and not uri.startswith("sqlite:///"):
        raise StoreError(
            f"tracking URI {uri!r}: a sqlite URI has three slashes (sqlite:///relative.db, sqlite:////abs.db)"
        )
    if scheme in DRIVERS:
        try:
            importlib.import_module(DRIVERS[scheme])
        except ImportError:
            raise StoreError(f"tracking URI {uri!r} needs the Python package {DRIVERS[scheme]!r}: install it") from None
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(f"{uri.rstrip('/')}/health", timeout=5).raise_for_status()
        except requests.RequestException as e:
            raise StoreError(f"tracking server {uri} is unreachable ({type(e).__name__})") from None
    path = sqlite_path(uri)
    if path is not None:
        folder = path.resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise StoreError(f"tracking store {uri}: folder {folder} is missing or not writable")


@contextmanager
def lock(uri: str):
    """An exclusive lock on `<db>.lock` beside a sqlite store; nothing to lock for a server."""
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    with open(f"{path}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class NoTraceback(logging.Filter):
    """MLflow logs a store error with its traceback; we report store errors in one line ourselves."""

    def filter(self, record):
        record.exc_info, record.exc_text = None, None
        return True


def setup() -> str:
    """Check the store, point MLflow at it and make the experiment exist; returns the tracking URI.
    Any failure (a file that is not a database, a truncated one, a server that refuses) is one line."""
    import mlflow

    for handler in logging.getLogger("mlflow").handlers:
        handler.addFilter(NoTraceback())
    uri = tracking_uri()
    check(uri)
    mlflow.set_tracking_uri(uri)
    try:
        with lock(uri):  # the first touch creates (migrates) a sqlite store: one process at a time
            name = experiment_name()
            if mlflow.get_experiment_by_name(name) is None:
                create_experiment(name, uri)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise StoreError(f"tracking store {uri} cannot be used: {first}") from None
    if not os.environ.get("MLFLOW_RUN_ID"):  # under `mlflow run`, the run (and its experiment) exists
        mlflow.set_experiment(name)
    return uri


def create_experiment(name: str, uri: str) -> None:
    """A sqlite store keeps its artifacts beside the database file (not in the current directory)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    path = sqlite_path(uri)
    location = (path.resolve().parent / "mlruns").as_uri() if path else None
    try:
        mlflow.create_experiment(name, artifact_location=location)
    except MlflowException as e:  # another process created it first: fine
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
