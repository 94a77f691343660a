"""`trainer sweep`: child runs under one parent; a failing child is recorded and the rest go on."""

from mlflow.tracking import MlflowClient


def test_sweep_nests_children_and_aggregates_per_model(store, run_cli, data_dir):
    result = run_cli("sweep", "--models", "step5,tiny", "--seeds", "1,2", "--subset", "300", "--epochs", "1",
                     "--workers", "0", "--data-dir", data_dir)  # fmt: skip
    assert result.exit_code == 0, result.output
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    names = ["step5-s1-subset300", "step5-s2-subset300", "tiny-s1-subset300", "tiny-s2-subset300"]
    assert sorted(r.info.run_name for r in children) == names
    metrics = parent.data.metrics
    for model in ("step5", "tiny"):
        accs = [r.data.metrics["best_test_acc"] for r in children if r.data.params["model"] == model]
        assert abs(metrics[f"{model}.best_test_acc.mean"] - sum(accs) / 2) < 1e-9
        assert f"{model}.last3_min_test_acc.std" in metrics and metrics[f"{model}.seeds_met_target"] == 0
    assert metrics["failed_runs"] == 0 and parent.info.status == "FINISHED"


def test_a_failing_child_is_recorded_and_the_sweep_goes_on(store, run_cli, data_dir):
    # tiny's loss explodes at this lr schedule, step5 (with its recipe's onecycle) survives it
    result = run_cli("sweep", "--models", "tiny,step3", "--seeds", "1", "--subset", "300", "--epochs", "2",
                     "--workers", "0", "--scheduler", "step", "--step-size", "1", "--gamma", "1e6", "--lr", "0.01",
                     "--data-dir", data_dir)  # fmt: skip
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    status = {r.info.run_name: r.info.status for r in runs if "mlflow.parentRunId" in r.data.tags}
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    failed = sum(s == "FAILED" for s in status.values())
    assert set(status) == {"tiny-s1-subset300", "step3-s1-subset300"} and failed >= 1
    assert parent.data.metrics["failed_runs"] == failed
    assert result.exit_code == 1 and f"{failed} of 2 runs failed" in result.output
