# shoprec: `make pipeline` runs the main job on the real data, `make test` runs the tests.
# Both create .venv and install what they need on a fresh machine.

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# No telemetry from the tools: this machine reaches only package registries.
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export BENTOML_DO_NOT_TRACK ?= true
export DVC_NO_ANALYTICS ?= 1
# A local flow run starts a temporary Prefect API; on a busy 2-core machine it can take
# longer than Prefect's default 20 s to come up.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export OPENBLAS_NUM_THREADS ?= 1
# dvc.yaml stages call the installed `shoprec` CLI, and the train flow calls `dvc`.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install pipeline ingest test test-fast lint bench clean-data

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip uv
	$(BIN)/uv pip install --python $(BIN)/python -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Main job: ingest the real data, train and evaluate the two-stage model, register the
## champion in the BentoML model store.
pipeline: install
	$(BIN)/shoprec ingest
	$(BIN)/shoprec train
	$(BIN)/shoprec evaluate

ingest: install
	$(BIN)/shoprec ingest

## Every test, integration tests with real Prefect, GX, DVC and BentoML included.
test: install
	$(BIN)/python -m pytest

## Unit tests only (no real services, no real data).
test-fast: install
	$(BIN)/python -m pytest -m "not integration and not slow"

lint: install
	$(BIN)/ruff check src flows tests bench
	$(BIN)/ruff format --check src flows tests bench

bench: install
	$(BIN)/python bench/ingest_bench.py --runs 3
