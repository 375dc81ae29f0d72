# segpipe: `make demo` runs the whole chain on the embedded dataset; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CREDS := .segpipe/credentials.env
WITH_STACK := set -a && source $(CREDS) && set +a &&

.PHONY: setup stack-up stack-down stack-status deploy demo repro test test-fast bench-validate lint clean

setup: $(VENV)/.installed                 ## create .venv with the pinned, verified dependency set

$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $@

stack-up: setup                           ## SeaweedFS S3 + Prefect server/worker + leaderboard on 127.0.0.1
	$(BIN)/segpipe stack up

stack-down:
	$(BIN)/segpipe stack down

stack-status:
	$(BIN)/segpipe stack status

deploy: stack-up                          ## register the full-pipeline deployments (demo, nightly)
	$(WITH_STACK) $(BIN)/prefect --no-prompt deploy --all

demo: deploy                              ## run the whole chain through the Prefect worker and print the score
	@start=$$(date +%s); \
	$(WITH_STACK) PATH=$(CURDIR)/$(BIN):$$PATH prefect deployment run full-pipeline/demo --watch && \
	$(BIN)/python -m flows.summary && echo "demo wall time: $$(( $$(date +%s) - start )) s"

repro: stack-up                           ## the same chain stage by stage through DVC
	$(WITH_STACK) PATH=$(CURDIR)/$(BIN):$$PATH dvc repro

test: setup                               ## unit + integration tests (real SeaweedFS, real Prefect)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest

test-fast: setup                          ## skip the end-to-end runs
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -m "not slow"

bench-validate: setup                     ## time validation + EDA on competition-sized synthetic data (under /tmp)
	$(BIN)/python -m scripts.bench_validate

clean:
	rm -rf runs artifacts
