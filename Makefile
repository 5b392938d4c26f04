# One-command set-up: `make run` (main job) and `make test` (tests) work from a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
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

## bench: data-pipeline scale benchmark (10M synthetic events), figures go to BENCHMARKS.md by hand
bench: $(STAMP)
	$(BIN)/python benchmarks/preprocess_scale.py --events 10000000

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
