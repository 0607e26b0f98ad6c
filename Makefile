# towerflow: `make pipeline` runs the whole pipeline on the demo; `make test` runs the tests.
# Both create/update .venv first. Telemetry of every library is off (flows/environment.py sets the
# same switches for any `towerflow` command).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export DVC_NO_UPDATER := 1
export GX_ANALYTICS_ENABLED := false
export PREFECT_HOME := $(CURDIR)/.prefect
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup pipeline test bench ablate clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch==2.13.0 is pinned in pyproject.toml: pip takes the local CPU wheel.
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

pipeline: setup
	$(BIN)/towerflow run

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m flows.bench --out reports/bench.json

ablate: setup
	$(BIN)/towerflow ablate

clean:
	rm -rf data artifacts reports .prefect
