"""User errors: one line on stderr, a non-zero exit, never a traceback."""

import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

import models


def assert_one_line_error(result, code, *fragments):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(error_lines) == 1, result.output
    for fragment in fragments:
        assert fragment in error_lines[0]


def test_unknown_model_lists_the_valid_names(run_cli):
    result = run_cli("train", "--model", "resnet50")
    assert_one_line_error(result, 2, "resnet50", *models.list_models())
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "option, name, valid",
    [("--augment", "heavy", "standard"), ("--optimizer", "lamb", "adamw"), ("--scheduler", "poly", "onecycle")],
)
def test_unknown_names_list_the_valid_ones(run_cli, option, name, valid):
    result = run_cli("train", option, name)
    assert_one_line_error(result, 2, name, valid)


@pytest.mark.parametrize(
    "option, value",
    [
        ("--epochs", "0"),
        ("--epochs", "-3"),
        ("--epochs", "ten"),
        ("--lr", "0"),
        ("--lr", "-0.1"),
        ("--lr", "fast"),
        ("--batch-size", "0"),
        ("--subset", "0"),
        ("--seed", "1.5"),
        ("--seed", "abc"),
    ],
)
def test_invalid_numbers_are_usage_errors(run_cli, option, value):
    result = run_cli("train", option, value)
    assert_one_line_error(result, 2, option)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_data_dir(run_cli, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    result = run_cli("data", "--data-dir", locked / "mnist")
    assert_one_line_error(result, 1, "not writable")


def test_data_dir_that_is_a_file(run_cli, tmp_path):
    (tmp_path / "file").write_text("")
    result = run_cli("data", "--data-dir", tmp_path / "file")
    assert_one_line_error(result, 1, "not writable")


@pytest.mark.parametrize("command", ["train", "bench"])
def test_compile_without_a_compiler_is_one_line_before_training(run_cli, monkeypatch, store, data_dir, command):
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CXX", raising=False)
    result = run_cli(command, "--compile", "--subset", "100", "--data-dir", data_dir)
    assert_one_line_error(result, 1, "--compile needs a C++ compiler")
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("tests")
    assert experiment is None or not client.search_runs([experiment.experiment_id])  # no run was started


def test_models_lists_every_variant_with_params(run_cli):
    result = run_cli("models")
    assert result.exit_code == 0
    for name in models.list_models():
        assert name in result.output
    assert "7,574" in result.output


def test_console_script_reports_errors_without_traceback():
    """The installed `trainer` entry point, in a real process."""
    trainer = os.path.join(os.path.dirname(sys.executable), "trainer")
    done = subprocess.run([trainer, "train", "--model", "nope"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("Error: unknown model 'nope'") and "Traceback" not in done.stderr
