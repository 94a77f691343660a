"""Faults: kill and resume with nothing lost, unreadable checkpoints, NaN losses, unreachable
stores, and parallel runs into one store (sqlite and a local `mlflow server`)."""

import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import SMOKE, free_port, per_epoch, runs_of, start_server, stop_server, stopped, store_env, trainer

from trainer.checkpoints import epoch_of


def test_sigterm_ends_the_run_killed_and_resume_matches_an_uninterrupted_run(data_dir, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = store_env(uri)
    # The trainer stops itself as epoch 3's training starts; SIGTERM then lands there once it continues.
    # (Polling for epoch 2's checkpoint instead missed it on a fast CPU: epochs of 0.3 s.)
    fault = "before|trainer.engine.train_one_epoch|epoch 3/4|STOP"
    proc = trainer("train", *SMOKE, "--epochs", "4", "--data-dir", data_dir, env=env, fault=fault)
    deadline = time.time() + 300
    while not stopped(proc.pid):
        assert time.time() < deadline and proc.poll() is None, "the trainer never reached epoch 3"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 143 and "Traceback" not in output, output
    client, (run,) = runs_of(uri)
    killed = client.get_run(run.info.run_id)
    assert killed.info.status == "KILLED"
    assert epoch_of(killed.data.tags["last_checkpoint"]) == 2  # the epoch in flight is lost, nothing before it

    resumed = trainer("train", "--resume", run.info.run_id, "--data-dir", data_dir, env=env)
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert client.get_run(run.info.run_id).info.status == "FINISHED"

    straight = trainer("train", *SMOKE, "--epochs", "4", "--data-dir", data_dir, env=env)
    assert straight.communicate(timeout=300)[0] and straight.returncode == 0
    _, runs = runs_of(uri)
    other = next(r for r in runs if r.info.run_id != run.info.run_id)
    assert per_epoch(client, run.info.run_id) == per_epoch(client, other.info.run_id)
    assert [s for s, _ in per_epoch(client, run.info.run_id)["test_acc"]] == [1, 2, 3, 4]


def test_resume_refuses_a_tampered_checkpoint(data_dir, tmp_path, store, run_cli):
    result = run_cli("train", *SMOKE, "--epochs", "1", "--data-dir", data_dir)
    assert result.exit_code == 0, result.output
    client, (run,) = runs_of(store, "tests")
    client.set_terminated(run.info.run_id, "KILLED")
    checkpoint = next(Path(run.info.artifact_uri.removeprefix("file://")).glob("checkpoints/epoch_001.pt"))
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])  # truncated
    result = run_cli("train", "--resume", run.info.run_id, "--data-dir", data_dir)
    assert result.exit_code == 1 and "sha256 mismatch" in result.output and "Traceback" not in result.output
    assert "no checkpoint verifies" in result.output

    evil = subprocess.run(
        [sys.executable, "-c", f"import torch, os; torch.save({{'epoch': os.system}}, {str(checkpoint)!r})"],
        capture_output=True,
    )
    assert evil.returncode == 0, evil.stderr
    client.set_tag(run.info.run_id, "last_checkpoint_sha256", hashlib.sha256(checkpoint.read_bytes()).hexdigest())
    result = run_cli("train", "--resume", run.info.run_id, "--data-dir", data_dir)  # a pickle naming os.system
    assert result.exit_code == 1 and "unreadable" in result.output


def test_nan_loss_fails_the_run_with_the_reason_and_keeps_the_last_good_checkpoint(data_dir, store, run_cli):
    exploding = ["--scheduler", "step", "--step-size", "1", "--gamma", "1e6", "--lr", "0.01"]  # lr x1e6 per epoch
    result = run_cli("train", *SMOKE, "--model", "tiny", "--epochs", "3", *exploding, "--data-dir", data_dir)
    assert result.exit_code == 1 and "non-finite" in result.output, result.output
    client, (run,) = runs_of(store, "tests")
    assert run.info.status == "FAILED"
    assert "non-finite training loss" in run.data.tags["failure_reason"]
    assert run.data.tags["last_checkpoint"] == "checkpoints/epoch_001.pt"


def test_unreachable_tracking_server_is_reported_before_training(run_cli, monkeypatch, data_dir):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    started = time.time()
    result = run_cli("train", "--model", "step5", "--subset", "100", "--data-dir", data_dir)
    assert result.exit_code == 1 and "http://127.0.0.1:9 is unreachable" in result.output
    assert "Traceback" not in result.output and time.time() - started < 30


def test_store_in_a_missing_folder_is_reported(run_cli, monkeypatch, tmp_path, data_dir):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/missing/mlflow.db")
    result = run_cli("train", "--subset", "100", "--data-dir", data_dir)
    assert result.exit_code == 1 and "missing or not writable" in result.output


def run_four_at_once(uri, data_dir, cwd):
    procs = [
        trainer(
            "train",
            "--model",
            "step5",
            "--subset",
            "500",
            "--epochs",
            "2",
            "--workers",
            "0",
            "--seed",
            seed,
            "--data-dir",
            data_dir,
            env=store_env(uri),
            cwd=cwd,
        )  # fmt: skip
        for seed in (1, 2, 3, 4)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out
        assert "database is locked" not in out
    client, runs = runs_of(uri)
    assert sorted(r.info.run_name for r in runs) == [f"step5-s{seed}-subset500" for seed in (1, 2, 3, 4)]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert {"model", "epochs", "lr", "num_params", "seed"} <= set(run.data.params)
        assert all([s for s, _ in v] == [1, 2] for v in per_epoch(client, run.info.run_id).values())
        source = f"source_run_id = '{run.info.run_id}'"
        assert client.search_logged_models([run.info.experiment_id], filter_string=source), "model not logged"


def test_four_parallel_runs_into_one_sqlite_store(data_dir, tmp_path):
    run_four_at_once(f"sqlite:///{tmp_path / 'fresh.db'}", data_dir, tmp_path)


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    server = start_server(tmp_path, port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_server(server)


def test_four_parallel_runs_into_a_local_mlflow_server(data_dir, tmp_path, mlflow_server):
    run_four_at_once(mlflow_server, data_dir, tmp_path)
