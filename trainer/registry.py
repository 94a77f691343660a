"""The model registry: each variant's best full run as a registered model version with the alias
`best`, so `models:/mnist8k-step5@best` names it for `mlflow models serve` and `trainer predict`."""

import mlflow
from mlflow.tracking import MlflowClient

from trainer.results import search

ALIAS = "best"


def registered_name(variant: str) -> str:
    return f"mnist8k-{variant}"


def best_runs(experiment: str | None = None) -> dict:
    """{variant: run}: among its finished full-data runs, the one whose model scores highest (the last
    epoch's test accuracy, which is the saved model's; then the minimum of the last 3; then the newest)."""
    best, scores = {}, {}
    for run in search(experiment):  # newest first: on a tie the newest stays
        variant, m = run.data.params["model"], run.data.metrics
        score = (m.get("test_acc", 0.0), m.get("last3_min_test_acc", 0.0))
        if variant not in best or score > scores[variant]:
            best[variant], scores[variant] = run, score
    return best


def register_best(experiment: str | None = None) -> list[tuple[str, str, object]]:
    """Register each variant's best run (once: a run registered before keeps its version) and point the
    alias at it. Returns (registered model name, version, run) per variant."""
    client = MlflowClient()
    registered = []
    for variant, run in best_runs(experiment).items():
        name, run_id = registered_name(variant), run.info.run_id
        known = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        if known:
            version = known[0].version
        else:  # the run's model is an MLflow 3 logged model: registered by its own URI
            (model,) = client.search_logged_models([run.info.experiment_id], f"source_run_id = '{run_id}'")
            version = mlflow.register_model(f"models:/{model.model_id}", name).version
        client.set_registered_model_alias(name, ALIAS, version)
        registered.append((name, str(version), run))
    return registered
