"""`mlflow run . --env-manager local` runs the MLproject entry point end to end (a smoke run)."""

import os
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parent.parent


def test_mlflow_run_trains_and_tracks(data_dir, tmp_path):
    bin_dir = Path(sys.executable).parent
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_EXPERIMENT_NAME": "smoke",
    }
    env.pop("MLFLOW_RUN_ID", None)
    params = ["-P", "model=step5", "-P", "epochs=1", "-P", "subset=500", "-P", f"data_dir={Path(data_dir).resolve()}"]
    done = subprocess.run(
        [bin_dir / "mlflow", "run", ROOT, "--env-manager", "local", *params],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    training = by_name["step5-s1"]
    assert training.info.status == "FINISHED"
    assert training.data.params["epochs"] == "1" and training.data.params["lr"] == "0.1"  # recipe filled in
    assert "test_acc" in training.data.metrics
    project_run = client.get_run(training.data.tags["mlflow.parentRunId"])
    assert project_run.info.status == "FINISHED" and project_run.data.params["lr"] == "recipe"
