# The two commands of the README: `make train` and `make test`. Both set up .venv first if missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL ?= step5
export MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db

.PHONY: setup data train test lint bench clean

$(BIN)/trainer: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/trainer

data: setup
	$(BIN)/trainer data

train: data
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/mlflow run . --env-manager local -P model=$(MODEL)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint data
	$(BIN)/pytest

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
