"""`mlflow run . --env-manager local` runs the MLproject entry point end to end (a smoke run)."""

import os
import subprocess
import sys
from pathlib import Path

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


def test_mlflow_run_trains_and_tracks(data_dir, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data = f"data_dir={Path(data_dir).resolve()}"
    mlflow_run(uri, tmp_path, "-P", "model=step5", "-P", "epochs=1", "-P", "subset=500", "-P", data)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    training = by_name["step5-s1"]
    assert training.info.status == "FINISHED"
    assert training.data.params["epochs"] == "1" and training.data.params["lr"] == "0.1"  # recipe filled in
    assert "test_acc" in training.data.metrics
    project_run = client.get_run(training.data.tags["mlflow.parentRunId"])
    assert project_run.info.status == "FINISHED" and project_run.data.params["lr"] == "recipe"


def test_sweep_and_report_entry_points(data_dir, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data = f"data_dir={Path(data_dir).resolve()}"
    mlflow_run(uri, tmp_path, "-e", "sweep", "-P", "models=tiny", "-P", "seeds=1,2", "-P", "epochs=1",
               "-P", "subset=300", "-P", data)  # fmt: skip
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.data.params["models"] == "tiny" and parent.data.metrics["failed_runs"] == 0
    assert sorted(r.info.run_name for r in runs if r.info.run_id != parent.info.run_id) == ["tiny-s1", "tiny-s2"]
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
