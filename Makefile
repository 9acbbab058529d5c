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

# Last day of the first training set: the replay starts the day after (params.yaml: replay.cutoff).
REPLAY_CUTOFF = $(shell $(BIN)/python -c "import yaml; print(yaml.safe_load(open('params.yaml'))['replay']['cutoff'])")

.PHONY: install redis pipeline ingest test test-fast lint bench clean-data

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip uv
	$(BIN)/uv pip install --python $(BIN)/python -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## redis-server for the Redis tests (Debian package); the tests start it on loopback themselves.
redis:
	scripts/install-redis.sh

## Main job: play the real year as the shop lived it. Ingest the days up to the replay cutoff,
## train and register the first champion, build the Bento, replay every later day (ingest,
## monitor, retrain when the rule fires), then train and evaluate on the full store with the
## fixed protocol and build the Bento of the final champion.
pipeline: install
	$(BIN)/shoprec ingest --until $(REPLAY_CUTOFF)
	$(BIN)/shoprec train
	$(BIN)/shoprec build-bento
	$(BIN)/shoprec replay
	$(BIN)/shoprec train
	$(BIN)/shoprec build-bento
	$(BIN)/shoprec evaluate
	$(BIN)/shoprec status
	@echo
	@echo "Reports:"
	@echo "  validation   reports/validation/ (GX Data Docs: reports/validation/data_docs/index.html)"
	@echo "  evaluation   reports/evaluation/index.html, reports/metrics.json"
	@echo "  drift        reports/drift/index.html"
	@echo "  replay       reports/replay/summary.md, reports/replay/timeline.png"
	@echo "Serve the champion:  SHOPREC_API_TOKEN=change-me $(BIN)/bentoml serve --port 3000"

ingest: install
	$(BIN)/shoprec ingest

## Every test, integration tests with real Prefect, GX, DVC, BentoML and Redis included.
test: install redis
	$(BIN)/python -m pytest

## Unit tests only (no real services, no real data).
test-fast: install
	$(BIN)/python -m pytest -m "not integration and not slow"

lint: install
	$(BIN)/ruff check src flows tests bench
	$(BIN)/ruff format --check src flows tests bench

bench: install
	$(BIN)/python bench/ingest_bench.py --runs 3
