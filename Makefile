# Every step that CI runs is a target here, so local equals CI. ./dev installs system packages first.
VENV   ?= .venv
PYTHON ?= python3
BIN     = $(VENV)/bin
SOURCES = loader tests bench

.PHONY: run test check unit venv clean

venv: $(VENV)/.installed

# Python >= 3.10 with venv; the dev extras take current releases from PyPI.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

run: venv
	scripts/run-dev

check: venv
	$(BIN)/ruff format --check $(SOURCES)
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/mypy loader tests/emulator

unit: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test: check unit

clean:
	rm -rf $(VENV) run .mypy_cache .pytest_cache .ruff_cache build dist
