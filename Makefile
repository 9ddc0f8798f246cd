# `make demo`: set up, train fold 1 of the quick preset on the demo data, score its test recordings against the
# gate.  `make test`: the test suite.  `make bench`: the input pipeline against the notebook's.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db

.PHONY: install demo test test-slow bench ui clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# The demo's test LWLRAP must reach this: the quick preset reached 0.8861 (README, "Quick start").
DEMO_GATE ?= 0.85

demo: install
	mkdir -p data
	set -o pipefail; mlflow run . --env-manager local --experiment-name rfcx -P fold=1 \
		-P config=experiments/quick.yaml | tee data/demo-run.log
	python -m rfcx_mlops.predict --out data/demo-submission.csv --min-lwlrap $(DEMO_GATE) \
		--run-id "$$(sed -n 's/^run \([0-9a-f]*\): fold 1 .*/\1/p' data/demo-run.log | tail -n 1)"

test: install
	$(BIN)/lint-imports --no-logo
	$(BIN)/python -m pytest

test-slow: install
	$(BIN)/python -m pytest -m slow

bench: install
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python benchmarks/pipeline.py

ui: install
	mlflow ui --host 127.0.0.1 --port 5000

clean:
	rm -rf $(VENV) data mlruns mlartifacts mlflow.db optuna.db submission.csv runs.csv
