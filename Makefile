# Every target installs what it needs into .venv, so a fresh clone needs only python3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help test run bench soak crash clean
.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | awk -F'\t' '{printf "make %-6s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,fast,postgres]'
	touch $(STAMP)

# The suite under coverage, counting the service and CLI processes the tests start (see
# [tool.coverage] in pyproject.toml): one combined branch-coverage report, then the runtime.
# Two pytest processes share the tests (--shard, tests/conftest.py): most of a test's time
# is spent waiting on the processes and clocks it runs, which two halves overlap. The second
# half's output follows the first's. Fails if a test fails or coverage is under fail_under.
test: export COVERAGE_FILE = $(CURDIR)/.coverage
test: $(STAMP) ## the whole suite under coverage (installs what it needs into .venv)
	@started=$$(date +%s); \
	rm -f .coverage .coverage.*; \
	$(BIN)/python -m coverage run -m pytest -q -p no:cacheprovider --shard 2/2 >$(VENV)/test-half-2.log 2>&1 & \
	second=$$!; \
	$(BIN)/python -m coverage run -m pytest -q -p no:cacheprovider --shard 1/2; first=$$?; \
	wait $$second; second=$$?; \
	echo "--- the second half of the tests (--shard 2/2):"; cat $(VENV)/test-half-2.log; \
	$(BIN)/python -m coverage combine --quiet; \
	$(BIN)/python -m coverage report; covered=$$?; \
	echo "make test: $$(( $$(date +%s) - started )) s"; \
	[ $$first -eq 0 ] && [ $$second -eq 0 ] && [ $$covered -eq 0 ]

# Your Stark Bank project when STARK_PROJECT_ID is set (environment or .env),
# otherwise the built-in emulator: nothing to configure to try it.
run: $(STAMP) ## run the service: your project if STARK_PROJECT_ID is set, else the built-in emulator
	@if [ -n "$$STARK_PROJECT_ID" ] || grep -Eqs '^(export +)?STARK_PROJECT_ID *= *[^ ]' .env; then \
		$(BIN)/python -m stark_challenge; \
	else \
		echo "make run: STARK_PROJECT_ID is not set, so the service runs against the built-in Stark Bank emulator"; \
		$(BIN)/python -m stark_challenge --emulator; \
	fi

bench: $(STAMP) ## the webhook benchmark, then its PostgreSQL phase (prints figures)
	$(BIN)/python bench/webhook_bench.py
	$(BIN)/python bench/postgres_bench.py

# The service under steady traffic for SOAK_MINUTES (default 30): memory, threads, files and
# the database sampled every 30 s; writes bench/soak.json and bench/soak.svg (docs/benchmarks.md, "Soak").
soak: $(STAMP) ## the soak run: SOAK_MINUTES (30) of steady traffic, memory sampled
	$(BIN)/python bench/soak.py

# The service killed with SIGKILL at every durable step of the money path's story (each
# commit, each call to Stark Bank before and after Stark Bank carried it out), restarted,
# settled, and checked against the emulator's ledger (tests/crashpoints), on SQLite and then
# on PostgreSQL (a throwaway server). One point alone: make crash POINT=call:12:before
# (POINT=postgres:call:12:before on PostgreSQL); one backend: make crash BACKEND=sqlite.
crash: $(STAMP) ## kill the service at every durable step of the money path, on SQLite and PostgreSQL; check what must hold (POINT=... for one)
	PYTHONPATH=tests $(BIN)/python -m crashpoints $(if $(POINT),--point $(POINT)) $(if $(BACKEND),--backend $(BACKEND))

clean: ## remove .venv, build files and coverage data
	rm -rf $(VENV) .pytest_cache build *.egg-info .coverage .coverage.*
