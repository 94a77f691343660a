# The two commands of the README: `make train` and `make test`. Both set up .venv first if missing.
# `make train MODEL=step3 TRAIN_ARGS='-P seed=2 -P epochs=5'` passes MLproject parameters through.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL ?= step5
TRAIN_ARGS ?=
export MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db
export MLFLOW_EXPERIMENT_NAME ?= mnist8k

.PHONY: setup data train test lint bench server clean

$(BIN)/trainer: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/trainer

data: setup
	$(BIN)/trainer data

train: data
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/mlflow run . --env-manager local --experiment-name $(MLFLOW_EXPERIMENT_NAME) \
		-P model=$(MODEL) $(TRAIN_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint data
	$(BIN)/pytest

# PostgreSQL-backed tracking server with basic auth on 127.0.0.1:5000 (README, Scale out); needs
# MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD in the environment. `make server SERVER_ARGS='--port 5001'`.
SERVER_ARGS ?=
server: setup
	$(BIN)/trainer server $(SERVER_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
