"""A real 1-epoch run on a 2,000-image subset logs everything a user compares and reloads."""

import dataclasses
import json
import re
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from trainer.cli import cli
from trainer.config import Config

PARAMS = {f for f in Config.__dataclass_fields__} | {"num_params"}
METRICS = {"train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_seconds"}
SUMMARY = {"best_test_acc", "best_epoch", "best_train_acc", "last3_min_test_acc", "target_met"}
TAGS = {"model", "description", "mlflow.note.content", "git_commit", "torch_version", "mlflow_version", "subset"}
ARTIFACTS = {
    "augment_preview.png",
    "model_summary.txt",
    "curves.png",
    "confusion_matrix.png",
    "misclassified.png",
    "checkpoints/epoch_001.pt",
    "config.json",
}  # the model itself is an MLflow 3 LoggedModel of the run: see the pyfunc test


@pytest.fixture(scope="module")
def tracked(data_dir, tmp_path_factory):
    """One smoke run into a temporary sqlite store: (client, run)."""
    from click.testing import CliRunner

    tmp = tmp_path_factory.mktemp("store")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "MLFLOW_EXPERIMENT_NAME": "tests"}
    result = CliRunner(env=env).invoke(
        cli, ["train", "--model", "step5", "--epochs", "1", "--subset", "2000", "--no-amp", "--data-dir", data_dir]
    )
    assert result.exit_code == 0, result.output
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    return client, run


def test_run_is_named_and_finished(tracked):
    _, run = tracked
    assert run.info.run_name == "step5-s1-subset2000" and run.info.status == "FINISHED"  # a smoke run says so


def test_every_param_of_the_resolved_config_is_logged(tracked):
    _, run = tracked
    assert PARAMS <= set(run.data.params)
    assert run.data.params["subset"] == "2000" and run.data.params["num_params"] == "7574"
    assert run.data.params["lr"] == "0.1" and run.data.params["scheduler"] == "onecycle"  # step5's recipe
    assert run.data.tags["subset"] == "2000"


def test_metrics_per_epoch_with_steps_and_the_summary(tracked):
    client, run = tracked
    for key in METRICS:
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1], key
    assert SUMMARY <= set(run.data.metrics)
    assert run.data.metrics["best_epoch"] == 1 and run.data.metrics["target_met"] == 0  # 1 epoch on 2k images
    assert 10 < run.data.metrics["test_acc"] <= 100
    assert 100 < run.data.metrics["peak_rss_mb"] < 64_000  # MB of this process (torch alone is > 100 MB)


def test_the_config_is_logged_typed_and_reads_back(tracked):
    client, run = tracked
    logged = Config.from_dict(json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config.json")))
    params = Config.from_params(run.data.params)
    assert logged == dataclasses.replace(params, device="auto")  # the param is the device it resolved to
    assert params.device == "cpu"
    assert logged.betas == (0.9, 0.999) and logged.subset == 2000 and logged.nesterov is True


def test_tags(tracked):
    _, run = tracked
    assert TAGS <= set(run.data.tags)
    assert run.data.tags["torch_version"].startswith("2.14.1")
    description = run.data.tags["mlflow.note.content"]  # the run page's Description box
    assert description.startswith("Smoke run on the first 2000 train and test images") and "step4 +" in description
    assert run.data.tags["git_commit"] == (checkout_commit() or "none")
    # the hardware the numbers depend on: CPU model name, CPUID family and model, PyTorch's kernels'
    # instruction set, native bf16 unit
    cpu = run.data.tags["cpu"]
    cpuinfo = Path("/proc/cpuinfo").read_text()
    family, model = (re.search(rf"^{key}\s*: (\d+)$", cpuinfo, re.M)[1] for key in ("cpu family", "model"))
    assert f"(family {family} model {model}; {torch.backends.cpu.get_cpu_capability()}" in cpu, cpu
    assert cpu.endswith(")"), cpu
    assert run.data.tags["gpu"] == "none"


def checkout_commit() -> str | None:
    """HEAD of the checkout these tests run from, or None outside one."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 and (root / ".git").exists() else None


def test_git_commit_is_the_project_checkout_even_inside_another_repository(tmp_path, monkeypatch):
    from trainer.tracking import git_commit

    other = tmp_path / "other"
    other.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=other, check=True)
    commit = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x"]
    subprocess.run(commit, cwd=other, check=True)
    monkeypatch.chdir(other)
    assert git_commit() == checkout_commit()


def test_artifacts(tracked):
    client, run = tracked

    def walk(path=None):
        for info in client.list_artifacts(run.info.run_id, path):
            yield info.path
            if info.is_dir:
                yield from walk(info.path)

    assert ARTIFACTS <= set(walk())


def test_model_reloads_through_pyfunc_and_predicts_class_probabilities(tracked, data_dir):
    from trainer.data import load_mnist

    _, run = tracked
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    images, labels = load_mnist(data_dir, train=False, subset=2000)  # the run's test subset, raw uint8
    out = model.predict(images.numpy())
    assert out["probabilities"].shape == (2000, 10) and out["probabilities"].dtype == np.float32
    accuracy = 100 * (out["class"] == labels.numpy()).mean()
    assert accuracy == pytest.approx(run.data.metrics["test_acc"], abs=0.051)  # it is the trained model


def test_logging_a_channels_last_model_warns_nothing(tmp_path, monkeypatch, data_dir):
    """Training runs channels_last; the logged copy is saved in the default layout, so saving it prints no
    torch.export warning into the user's run output."""
    import warnings

    import torch

    import models
    from trainer.data import load_mnist
    from trainer.serving import log_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    model = models.get_model("step5").to(memory_format=torch.channels_last)
    with warnings.catch_warnings(record=True) as caught, mlflow.start_run():
        warnings.simplefilter("always")
        log_model(model, load_mnist(data_dir, train=False, subset=2)[0].numpy())
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []
