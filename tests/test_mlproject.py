"""`mlflow run . --env-manager local` runs the MLproject entry point end to end (a smoke run)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parent.parent


BIN = Path(sys.executable).parent


def mlflow_run(uri, cwd, *args):
    """`mlflow run <repo> --env-manager local ARGS` with our venv first on PATH, into store `uri`."""
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_EXPERIMENT_NAME": "smoke",
    }
    for leaked in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):  # set by in-process runs of earlier tests
        env.pop(leaked, None)
    cmd = [BIN / "mlflow", "run", ROOT, "--env-manager", "local", *args]
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def project(data_dir, tmp_path_factory):
    """`mlflow run . -P model=step5 -P epochs=1 -P subset=500` into a fresh store; returns its URI."""
    tmp = tmp_path_factory.mktemp("project")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    data = f"data_dir={Path(data_dir).resolve()}"
    mlflow_run(uri, tmp, "-P", "model=step5", "-P", "epochs=1", "-P", "subset=500", "-P", data)
    return uri


def test_mlflow_run_trains_and_tracks(project):
    client = MlflowClient(project)
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {"step5-s1-subset500", "step5-s1-subset500-mlflow-run"}
    training = by_name["step5-s1-subset500"]
    assert training.info.status == "FINISHED" and "mlflow.parentRunId" not in training.data.tags
    assert training.data.params["epochs"] == "1" and training.data.params["lr"] == "0.1"  # recipe filled in
    assert "test_acc" in training.data.metrics
    project_run = by_name["step5-s1-subset500-mlflow-run"]  # the -P values as given, filed under the training
    assert project_run.data.tags["mlflow.parentRunId"] == training.info.run_id
    assert project_run.info.status == "FINISHED" and project_run.data.params["lr"] == "recipe"


def test_the_ui_lists_the_training_first_with_its_metrics_and_model(project, http_server):
    """Browser-free: the runs list the UI shows comes from the REST calls below (top-level runs, newest
    first; children fold under their parent). The server is started as `make ui` starts it."""
    ui = [BIN / "mlflow", "ui", "--backend-store-uri", project, "--workers", "1"]
    with http_server(ui, {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}) as url:
        assert requests.get(url, timeout=10).ok  # the page itself
        api = f"{url}/ajax-api/2.0/mlflow"
        experiment = requests.get(f"{api}/experiments/get-by-name", params={"experiment_name": "smoke"}).json()
        search = {"experiment_ids": [experiment["experiment"]["experiment_id"]], "run_view_type": "ACTIVE_ONLY",
                  "order_by": ["attributes.start_time DESC"], "max_results": 100}  # fmt: skip
        runs = requests.post(f"{api}/runs/search", json=search).json()["runs"]
        top = [run for run in runs if "mlflow.parentRunId" not in as_dict(run["data"]["tags"])]
        assert [run["info"]["run_name"] for run in top] == ["step5-s1-subset500"]
        (first,) = top
        params, tags = as_dict(first["data"]["params"]), as_dict(first["data"]["tags"])
        assert params["model"] == "step5" and params["lr"] == "0.1" and params["num_params"] == "7574"
        assert {"test_acc", "best_test_acc", "last3_min_test_acc", "target_met"} <= set(
            as_dict(first["data"]["metrics"])
        )
        assert tags["mlflow.note.content"].startswith("Smoke run on the first 500 train and test images")
        (output,) = first["outputs"]["model_outputs"]
        model = requests.get(f"{api}/logged-models/{output['model_id']}").json()["model"]["info"]
        assert model["name"] == "model" and model["source_run_id"] == first["info"]["run_id"]
        assert model["status"] == "LOGGED_MODEL_READY"


def as_dict(entries: list[dict]) -> dict:
    return {e["key"]: e.get("value") for e in entries}


def test_sweep_and_report_entry_points(data_dir, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data = f"data_dir={Path(data_dir).resolve()}"
    mlflow_run(uri, tmp_path, "-e", "sweep", "-P", "models=tiny", "-P", "seeds=1,2", "-P", "epochs=1",
               "-P", "subset=300", "-P", data)  # fmt: skip
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.data.params["models"] == "tiny" and parent.data.metrics["failed_runs"] == 0
    children = sorted(r.info.run_name for r in runs if r.info.run_id != parent.info.run_id)
    assert children == ["tiny-s1-subset300", "tiny-s2-subset300"]
    mlflow_run(uri, tmp_path, "-e", "report", "-P", f"out={tmp_path / 'results.md'}")
    assert "## Results" in (tmp_path / "results.md").read_text()


def test_mlproject_parameters_are_config_fields_passed_to_their_options():
    """The schema is the one declaration: every `main` parameter is a Config field passed to that field's
    option, and every recipe field that takes a value (flags can't: MLproject parameters are strings)
    can be set from `mlflow run -P`."""
    import re
    from dataclasses import fields

    import yaml

    from trainer.config import Config, value_type

    main = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["main"]
    by_name = {f.name: f for f in fields(Config)}
    passed = dict(re.findall(r"--([\w-]+) \{(\w+)\}", main["command"]))
    assert set(main["parameters"]) <= set(by_name)
    assert all(option == param.replace("_", "-") for option, param in passed.items())
    valued = {f.name for f in fields(Config) if f.metadata["recipe"] and value_type(f) is not bool}
    assert valued <= set(main["parameters"])
