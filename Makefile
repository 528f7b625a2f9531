# Every target installs what it needs into .venv, so a fresh clone needs only python3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test run bench soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,fast]'
	touch $(STAMP)

# The suite under coverage, counting the service and CLI processes the tests start (see
# [tool.coverage] in pyproject.toml): one combined branch-coverage report, then the runtime.
# Fails if a test fails or coverage is under fail_under.
test: export COVERAGE_FILE = $(CURDIR)/.coverage
test: $(STAMP)
	@started=$$(date +%s); \
	rm -f .coverage .coverage.*; \
	$(BIN)/python -m coverage run -m pytest -q; tests=$$?; \
	$(BIN)/python -m coverage combine --quiet; \
	$(BIN)/python -m coverage report; covered=$$?; \
	echo "make test: $$(( $$(date +%s) - started )) s"; \
	[ $$tests -eq 0 ] && [ $$covered -eq 0 ]

# Your Stark Bank project when STARK_PROJECT_ID is set (environment or .env),
# otherwise the built-in emulator: nothing to configure to try it.
run: $(STAMP)
	@if [ -n "$$STARK_PROJECT_ID" ] || grep -Eqs '^(export +)?STARK_PROJECT_ID *= *[^ ]' .env; then \
		$(BIN)/python -m stark_challenge; \
	else \
		echo "make run: STARK_PROJECT_ID is not set, so the service runs against the built-in Stark Bank emulator"; \
		$(BIN)/python -m stark_challenge --emulator; \
	fi

bench: $(STAMP)
	$(BIN)/python bench/webhook_bench.py

# The service under steady traffic for SOAK_MINUTES (default 30): memory, threads, files and
# the database sampled every 30 s; writes bench/soak.json and bench/soak.svg (README, "Soak").
soak: $(STAMP)
	$(BIN)/python bench/soak.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info .coverage .coverage.*
