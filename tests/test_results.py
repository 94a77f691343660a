"""compare / report / models read results back from the store. The runs here are logged directly
through the MLflow API with made-up accuracies, so the expected numbers are known exactly."""

import mlflow
import pytest

import models
from trainer import results, target
from trainer.config import Config


def log_fake_run(model, seed, test_acc, subset=None, status="FINISHED", drop=(), **overrides):
    """A run shaped like `trainer train` logs it (params, tags, per-epoch metrics, summary); the params
    in `drop` are left out, as in a run logged before they existed."""
    recipe = models.get_variant(model).recipe
    cfg = Config.for_variant(recipe, model=model, seed=seed, epochs=len(test_acc), subset=subset, **overrides)
    n_params = models.num_params(models.get_model(model))
    with mlflow.start_run(run_name=f"{model}-s{seed}") as run:
        params = {k: v for k, v in vars(cfg).items() if k not in drop}
        mlflow.log_params({**params, "num_params": n_params})
        mlflow.set_tags({"model": model, "subset": str(subset) if subset else "full"})
        for epoch, acc in enumerate(test_acc, 1):
            mlflow.log_metrics({"test_acc": acc, "train_acc": acc - 0.5}, step=epoch)
        best = max(range(len(test_acc)), key=test_acc.__getitem__)
        met = min(test_acc[-3:]) >= 99.4 and n_params < 8000
        mlflow.log_metrics(
            {
                "best_test_acc": test_acc[best],
                "best_epoch": best + 1,
                "last3_min_test_acc": min(test_acc[-3:]),
                "target_met": float(met),
            }
        )
    if status != "FINISHED":
        mlflow.tracking.MlflowClient().set_terminated(run.info.run_id, status)
    return run.info.run_id


@pytest.fixture
def fake_runs(store):
    mlflow.set_tracking_uri(store)
    mlflow.set_experiment("tests")
    log_fake_run("step5", 1, [99.0, 99.3, 99.41, 99.45, 99.5])
    log_fake_run("step5", 2, [99.0, 99.2, 99.42, 99.38, 99.46])  # one epoch below 99.4: not met
    log_fake_run("step1", 1, [98.0, 98.5, 98.9, 99.0, 99.1])
    log_fake_run("step5", 3, [99.9, 99.9, 99.9, 99.9, 99.9], subset=500)  # a smoke run: never a result
    log_fake_run("step5", 4, [99.9, 99.9, 99.9], status="KILLED")  # unfinished: never a result
    log_fake_run("step1", 1, [97.0, 97.5, 97.7], lr=0.05)  # newest step1-s1, but not step1's recipe
    mlflow.end_run()


def test_compare_lists_finished_full_runs_with_the_ui_columns(fake_runs, run_cli):
    result = run_cli("compare")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for column in results.COMPARE_COLUMNS:
        assert column in lines[0]
    body = "\n".join(lines[2:])
    assert len(lines[2:]) == 4 and "step5-s3" not in body and "step5-s4" not in body
    row = next(line for line in lines if line.startswith("step5-s1"))
    assert "99.50 (5)" in row and "99.41" in row and "yes" in row
    row = next(line for line in lines if line.startswith("step5-s2"))
    assert "99.38" in row and row.split()[-3] == "no"


def test_compare_filter_and_unknown_experiment(fake_runs, run_cli):
    result = run_cli("compare", "--filter", "params.model = 'step1'")
    assert [line.split()[0] for line in result.output.splitlines()[2:]] == ["step1-s1", "step1-s1"]
    result = run_cli("compare", "--experiment", "nope")
    assert result.exit_code == 1 and "no experiment named 'nope'" in result.output


def test_report_pulls_every_number_from_the_runs(fake_runs, run_cli, tmp_path):
    out = tmp_path / "results.md"
    result = run_cli("report", "--out", out)
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "| step5 | 98.98 | 99.48 | 99.44 | 7,574 | 5 | 1/2 |" in text  # means over seeds 1 and 2
    assert "| step1 | 98.60 | 99.10 | 99.00 | 73,514 | 5 | 0/1 |" in text
    assert "seed 2 (run" in text and "99.42, 99.38, 99.46" in text
    assert "99.90" not in text  # neither the smoke run nor the killed run
    assert "97.70" not in text  # nor the run that overrode step1's lr
    for name in models.list_models():
        assert f"### {name}" in text
    assert "**Write-up's claim:**" in text and "no full tracked run yet" in text
    assert "![accuracy vs parameters](frontier.png)" in text
    assert (tmp_path / "frontier.png").read_bytes().startswith(b"\x89PNG")
    assert "Seeds with >= 99.4% in every epoch from epoch 11 on: 0/2" in text  # step5's runs have 5 epochs


def test_report_json_keeps_other_hardware_and_shows_worst_epochs_per_hardware(fake_runs, run_cli, tmp_path):
    """One results file for every machine: a report from this store replaces the records of its own
    hardware, keeps the others' made with today's recipes, and the worst-epoch table shows each
    hardware's margin."""
    import json

    path = tmp_path / "results.json"
    recipe = results.recipe_record("step5")
    other = {"model": "step5", "seed": 1, "cpu": "AMD EPYC", "gpu": "none", "run_id": "x", "recipe": recipe,
             "test_acc": [99.5] * 5}  # fmt: skip
    replaced = {**other, "cpu": "unknown", "run_id": "old"}  # this store's hardware: replaced by its runs
    stale = {**other, "cpu": "Arm", "run_id": "stale", "recipe": {**recipe, "lr": 1.0}}  # another recipe: dropped
    path.write_text(json.dumps([other, replaced, stale]))
    result = run_cli("report", "--out", tmp_path / "results.md", "--json", path)
    assert result.exit_code == 0, result.output
    records = json.loads(path.read_text())
    assert other in records and not {"old", "stale"} & {r["run_id"] for r in records}
    assert all(r["recipe"] == results.recipe_record(r["model"]) for r in records)
    ours = {(r["model"], r["seed"]) for r in records if r["cpu"] == "unknown"}
    assert ours == {("step5", 1), ("step5", 2), ("step1", 1)}
    text = (tmp_path / "results.md").read_text()
    assert "| step5 | 3-5 | AMD EPYC | 99.50 | - |" in text  # 5-epoch runs: their last 3 epochs
    assert "| step5 | 3-5 | unknown | 99.41 | **99.38** |" in text
    path.write_text("{not json")
    result = run_cli("report", "--json", path)
    assert result.exit_code == 1 and "cannot read" in result.output and "Traceback" not in result.output
    assert path.read_text() == "{not json"  # a file it cannot read is left as it was


def test_the_target_rule():
    assert target.holds([99.0, 99.41, 99.40], 2)
    assert not target.holds([99.0, 99.41, 99.39], 2)
    assert not target.holds([99.5, 99.5], 3)  # a run shorter than that never holds
    assert target.met([99.0, 99.4, 99.41, 99.5], 7999, 15) and not target.met([99.4, 99.39, 99.5, 99.5], 7999, 15)
    assert not target.met([99.5] * 3, 8000, 15) and not target.met([99.5] * 16, 7999, 16)


def test_a_run_logged_before_a_recipe_key_existed_had_that_keys_default(store):
    """Runs from before `ema` existed trained without it: they still count for a recipe without an EMA,
    not for one with, and resume with it off (and in the layout they had)."""
    mlflow.set_tracking_uri(store)
    mlflow.set_experiment("tests")
    old_ref = log_fake_run("ref6712", 1, [99.0, 99.1], drop=("ema", "channels_last"))
    old_step5 = log_fake_run("step5", 1, [99.0, 99.1], drop=("ema", "channels_last"))
    runs = {run.info.run_id: run for run in results.search("tests")}
    assert results.follows_recipe(runs[old_ref]) and not results.follows_recipe(runs[old_step5])
    old_config = Config.from_params(mlflow.get_run(old_step5).data.params)
    assert models.get_variant("step5").recipe["ema"] > 0 and old_config.ema == 0.0
    assert old_config.channels_last is False  # those runs trained in NCHW: a resume stays bit-exact


def test_models_shows_rf_and_whether_the_latest_run_met_the_target(fake_runs, run_cli):
    result = run_cli("models")
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.output.splitlines()[2:]}
    assert rows["step5"][1:4] == ["7,574", "28", "no"]  # newest full step5 run: seed 2, not met
    assert rows["ref6712"][1:4] == ["6,712", "32", "-"]


def test_summary_prints_layers_params_rf_and_the_budget(run_cli):
    result = run_cli("summary", "ref6712")
    assert result.exit_code == 0, result.output
    assert "total params: 6,712 (under the 8,000 limit by 1,288)" in result.output
    assert "receptive field at the output: 32 px" in result.output
    conv = next(line for line in result.output.splitlines() if line.startswith("Conv2d-4"))
    assert conv.split()[1:] == ["10x24x24", "720", "5", "1"]
    result = run_cli("summary", "vgg")
    assert result.exit_code == 2 and "valid names" in result.output


def test_claim_verdict_compares_the_same_epochs():
    def result(accs):
        return results.Result("id", "ref-s1", "ref7944", 1, 7944, len(accs), accs, accs, {}, 1.0)

    verdict = results.claim_verdict((2, 3, 99.40), {1: result([98.0, 99.45, 99.41, 97.0])})
    assert "seed 1: 99.41%" in verdict and verdict.endswith("reproduced.")
    verdict = results.claim_verdict((2, 3, 99.40), {1: result([98.0, 99.45, 99.30]), 2: result([99, 99.5, 99.5])})
    assert "not reproduced" in verdict and "short by up to 0.10 points" in verdict
