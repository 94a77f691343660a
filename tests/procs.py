"""Real `trainer` processes and what they leave in a store: shared by the fault tests."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient

BIN = Path(sys.executable).parent
FAULTS = Path(__file__).parent / "faults"
EPOCH_KEYS = ("train_loss", "train_acc", "test_loss", "test_acc", "lr")
SMOKE = ["--model", "step5", "--subset", "1000", "--workers", "0", "--seed", "5"]


def store_env(uri, experiment="reliability", **extra):
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": experiment, **extra}
    env.pop("MLFLOW_RUN_ID", None)
    return env


def trainer(*args, env, fault=None, **kwargs):
    """A real `trainer` process (one thread: light enough to run several at once); `fault` is an
    MNIST8K_FAULT spec for tests/faults/sitecustomize.py."""
    env = {**env, "OMP_NUM_THREADS": "1"}
    if fault:
        env.update(MNIST8K_FAULT=fault, PYTHONPATH=os.pathsep.join(filter(None, [str(FAULTS), env.get("PYTHONPATH")])))
    cmd = [str(BIN / "trainer"), *map(str, args)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def finish(proc, timeout=300) -> str:
    return proc.communicate(timeout=timeout)[0]


def runs_of(uri, experiment="reliability"):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, (client.search_runs([exp.experiment_id]) if exp else [])


def per_epoch(client, run_id):
    """{metric: [(step, value), ...]} of the per-epoch metrics, in step order (duplicates kept)."""
    return {
        key: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
        for key in EPOCH_KEYS
    }


def wait_for_run(uri, matches, what: str, timeout=300, experiment="reliability"):
    """The first run for which `matches(run)` holds, polled every 0.1 s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        _, runs = runs_of(uri, experiment)
        for run in runs:
            if matches(run):
                return run
        time.sleep(0.1)
    raise AssertionError(f"no run {what} in {timeout} s")


def wait_for_tag(uri, key, value, exclude_finished=False):
    """The first run whose tag `key` equals `value` (and, with exclude_finished, that has not finished)."""
    return wait_for_run(
        uri,
        lambda run: run.data.tags.get(key) == value and not (exclude_finished and run.info.status == "FINISHED"),
        f"got {key} = {value}",
    )


def wait_for_checkpoint(uri):
    """The first run still training with a checkpoint logged, of any epoch (on a fast CPU a smoke epoch
    takes 0.3 s, about one poll: waiting for one named epoch's checkpoint could miss it)."""
    return wait_for_run(
        uri, lambda run: "last_checkpoint" in run.data.tags and run.info.status == "RUNNING", "logged a checkpoint"
    )


def models_of(client, run):
    source = f"source_run_id = '{run.info.run_id}'"
    return client.search_logged_models([run.info.experiment_id], filter_string=source)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp_path, port):
    store = ["--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", tmp_path / "art"]
    cmd = [BIN / "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1", *store]
    server = subprocess.Popen(
        list(map(str, cmd)), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    for _ in range(240):
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                return server
        except requests.RequestException:  # not listening yet, or too busy starting to answer
            time.sleep(0.25)
    stop_server(server)
    pytest.fail("mlflow server did not start")


def stop_server(server) -> None:
    """SIGKILL the server and its workers (its process group: uvicorn and job runners are its children)."""
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.wait()


def stopped(pid: int) -> bool:
    """Whether the process is stopped (SIGSTOP): a fault spec's `STOP` has been reached."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")
