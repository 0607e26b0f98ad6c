# towerflow: `make pipeline` runs the whole pipeline on the demo; `make test` runs the tests.
# Both create/update .venv first. Telemetry of every library is off (flows/environment.py sets the
# same switches for any `towerflow` command).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# `make bench` also times the embedded index backends on this many synthetic items (1000000: ~18 min)
INDEX_ITEMS ?= 100000

export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export DVC_NO_UPDATER := 1
export GX_ANALYTICS_ENABLED := false
# idle OpenMP threads spin briefly, then sleep: fast on an idle machine, fair on shared cores
# (flows/environment.py says why); a user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT is kept
ifeq ($(origin OMP_WAIT_POLICY),undefined)
export GOMP_SPINCOUNT ?= 10000
endif
export PREFECT_HOME := $(CURDIR)/.prefect
export PATH := $(CURDIR)/$(BIN):$(PATH)

PIP_VERSION := 26.3
# --generate-hashes: every file pip installs must match the hash recorded when the lock was made (a
# replaced or tampered release on the index fails the install); --allow-unsafe pins setuptools too.
LOCK_FLAGS := --quiet --extra dev --no-emit-find-links --no-emit-index-url --strip-extras --no-header \
              --annotation-style=line --generate-hashes --allow-unsafe

.PHONY: setup vendor lock pipeline test bench bench-offline bench-scale gate-bench ablate clean

setup: $(STAMP) vendor

# Every package version comes from requirements.lock (generated from pyproject.toml by `make lock`),
# so a fresh machine a month from now installs what passed CI, byte for byte: --require-hashes
# refuses any file whose sha256 is not the locked one. torch==2.13.0+cpu is the local wheel (pip's
# find-links). The project itself goes in after, without dependencies or an isolated build env (its
# build backend is the locked, hash-checked setuptools).
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet pip==$(PIP_VERSION)
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The browser assets the report pages load (flows/portal/assets.lock.json: npm releases, sha512-checked)
# into .cache/towerflow/vendor/, so reports render with no network; a no-op (~0.1 s) once there.
vendor: $(STAMP)
	$(BIN)/python -m flows.portal.vendor

# Re-resolve the lock after editing pyproject.toml's dependencies (UPGRADE=1: newest allowed versions).
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet pip==$(PIP_VERSION) pip-tools
	$(BIN)/pip-compile $(LOCK_FLAGS) $(if $(UPGRADE),--upgrade) -o requirements.lock pyproject.toml

pipeline: setup
	$(BIN)/towerflow run

# The suite on one worker more than the cores, at most 4 (pytest-xdist); TEST_WORKERS=0 runs it in one
# process. A worker waits about a sixth of the time (servers starting, stages and services in other
# processes, timeouts under test): on 2 cores 2 workers kept them 85-88 % busy, and 3 workers took
# 609 s where 2 took 648 s an hour apart on the same host. Each worker takes whole test files
# (--dist loadfile), so a module's fixture (a pipeline run) is built once; what several files share
# is built once per run under a file lock (tests/once.py). The files go out in the order
# tests/conftest.py gives (the long-running ones first), not xdist's by test count.
TEST_WORKERS ?= $(shell n=$$(( $$(nproc) + 1 )); echo $$(( n < 4 ? n : 4 )))

test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# Both benches below take N generated interactions (`make bench-scale N=1000000`).
N ?= 100000
# Feast's offline stores (features.offline_store) on N generated interactions: time and peak RSS of
# materialization and the training join, per store, into reports/offline_stores.json.
OFFLINE_STORES ?= file duckdb spark
bench-offline: setup
	$(BIN)/python -m flows.experiments.offline_bench --rows $(N) --stores $(OFFLINE_STORES) --out reports/offline_stores.json

bench: setup
	$(BIN)/towerflow bench --out reports/bench.json --index-items $(INDEX_ITEMS)

# The whole pipeline on N generated interactions (N/10 users, N/50 items), one row of
# reports/bench_scale.json per N
bench-scale: setup
	$(BIN)/towerflow bench --scale $(N)

# The whole pipeline on three generated data shapes, a healthy and four broken second runs each (~90 min)
gate-bench: setup
	$(BIN)/towerflow gate-bench

ablate: setup
	$(BIN)/towerflow ablate

clean:
	rm -rf data artifacts reports .prefect
