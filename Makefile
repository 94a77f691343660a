# The two commands of the README: `make train` and `make test`. Both set up .venv first if missing.
# `make train MODEL=step3 TRAIN_ARGS='-P seed=2 -P epochs=5'` passes MLproject parameters through.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL ?= step5
TRAIN_ARGS ?=
export MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db
export MLFLOW_EXPERIMENT_NAME ?= mnist8k

.PHONY: setup data train test test-docker lint bench clean

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

# The Docker image built (on a stand-in base) and run as the README says: needs a Docker engine, or root
# and docker.io + mmdebstrap installed (the suite then starts dockerd and stops it); see tests/test_docker.py.
test-docker: setup
	$(BIN)/pytest -m docker tests/test_docker.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
