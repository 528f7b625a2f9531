# Every target installs what it needs into .venv, so a fresh clone needs only python3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test run bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

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

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
