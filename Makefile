# One-command set-up: `make run` (main job) and `make test` (tests) work from a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench clean airflow mlflow-ui lock

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]' -c constraints.txt
	$(BIN)/pip check
	@test -d .git || git init --quiet
	@test -d .dvc || $(BIN)/dvc init --quiet
	touch $(STAMP)

## run: set up from nothing and reproduce the pipeline with DVC (dvc repro)
run: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

## test: set up from nothing, lint and run the test suite
test: $(STAMP)
	$(BIN)/ruff check .
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

## lock: re-resolve `.[dev]` in a scratch virtualenv and write the pins to constraints.txt (CI and the image use them)
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade pip && .lock-venv/bin/pip install --quiet -e '.[dev]'
	head -3 constraints.txt > constraints.new
	.lock-venv/bin/pip freeze --exclude-editable | grep -v '^#' | sed 's/+cpu$$//' >> constraints.new
	mv constraints.new constraints.txt && rm -rf .lock-venv

## bench: data-pipeline scale benchmark (10M synthetic events), figures go to BENCHMARKS.md by hand
bench: $(STAMP)
	$(BIN)/python benchmarks/preprocess_scale.py --events 10000000

## airflow: Airflow UI on http://127.0.0.1:$(AIRFLOW_PORT) with the retraining DAG (scheduler, DAG processor,
## triggerer, API server; SQLite in airflow_home/; password file printed, never the password). Ctrl-C stops it.
AIRFLOW_PORT ?= 8080
airflow: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pipeline.airflow_local --home "$(CURDIR)/airflow_home" \
		--dags "$(CURDIR)/dags" --port $(AIRFLOW_PORT)

## mlflow-ui: MLflow UI on http://127.0.0.1:$(MLFLOW_PORT) over the embedded store (runs, plots, registry aliases).
## Ctrl-C stops it. While it runs, `export MLFLOW_TRACKING_URI=http://127.0.0.1:$(MLFLOW_PORT)` logs through it.
MLFLOW_PORT  ?= 5000
MLFLOW_STORE ?= data/mlflow
mlflow-ui: $(STAMP)
	mkdir -p "$(MLFLOW_STORE)/artifacts"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/mlflow server \
		--host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1 \
		--backend-store-uri "sqlite:///$(abspath $(MLFLOW_STORE))/mlflow.db" \
		--artifacts-destination "$(abspath $(MLFLOW_STORE))/artifacts"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
