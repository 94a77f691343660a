"""A real 1-epoch run on a 2,000-image subset logs everything a user compares and reloads."""

import json

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from trainer.cli import cli
from trainer.config import Config

PARAMS = {f for f in Config.__dataclass_fields__} | {"num_params"}
METRICS = {"train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_seconds"}
SUMMARY = {"best_test_acc", "best_epoch", "best_train_acc", "last3_min_test_acc", "target_met"}
TAGS = {"model", "description", "git_commit", "torch_version", "mlflow_version", "subset"}
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
        cli, ["train", "--model", "step5", "--epochs", "1", "--subset", "2000", "--data-dir", data_dir]
    )
    assert result.exit_code == 0, result.output
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    return client, run


def test_run_is_named_and_finished(tracked):
    _, run = tracked
    assert run.info.run_name == "step5-s1" and run.info.status == "FINISHED"


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
    assert logged == Config.from_params(run.data.params)
    assert logged.betas == (0.9, 0.999) and logged.subset == 2000 and logged.nesterov is True


def test_tags(tracked):
    _, run = tracked
    assert TAGS <= set(run.data.tags)
    assert run.data.tags["torch_version"].startswith("2.14.1")


def test_artifacts(tracked):
    client, run = tracked

    def walk(path=None):
        for info in client.list_artifacts(run.info.run_id, path):
            yield info.path
            if info.is_dir:
                yield from walk(info.path)

    assert ARTIFACTS <= set(walk())


def test_model_reloads_through_pyfunc_and_predicts_class_scores(tracked, data_dir):
    from trainer.data import MNIST_MEAN, MNIST_STD, load_mnist

    _, run = tracked
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    images, labels = load_mnist(data_dir, train=False, subset=2000)  # the run's test subset
    x = ((images.numpy()[:, None] / 255.0 - MNIST_MEAN) / MNIST_STD).astype(np.float32)
    scores = model.predict(x)
    assert scores.shape == (2000, 10) and scores.dtype == np.float32
    accuracy = 100 * (scores.argmax(1) == labels.numpy()).mean()
    assert accuracy == pytest.approx(run.data.metrics["test_acc"], abs=0.051)  # it is the trained model


def test_logging_a_channels_last_model_warns_nothing(tmp_path, monkeypatch):
    """Training runs channels_last; the logged copy is saved in the default layout, so saving it prints no
    torch.export warning into the user's run output."""
    import warnings

    import torch

    import models
    from trainer.tracking import log_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    model = models.get_model("step5").to(memory_format=torch.channels_last)
    with warnings.catch_warnings(record=True) as caught, mlflow.start_run() as run:
        warnings.simplefilter("always")
        log_model(model, torch.device("cpu"), run.info.run_id)
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []
