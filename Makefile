# Every step that CI runs is a target here, so local equals CI. ./dev installs system packages first.
VENV   ?= .venv
PYTHON ?= python3
BIN     = $(VENV)/bin
SOURCES = loader tests bench

.PHONY: run test check unit venv clean deb piuparts bench

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
	$(BIN)/mypy $(SOURCES)
	shellcheck dev scripts/run-dev scripts/build-deb scripts/debian-root packaging/debian/azaion-loader.postrm
	# The unit's exposure, in tenths: 15 is 1.5 (docker.service scores 9.6).
	systemd-analyze security --offline=true --threshold=15 --no-pager systemd/azaion-loader.service >/dev/null

unit: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test: check unit

# The .deb from this tree, built on Debian's own Python packages with a clean PATH.
deb:
	scripts/build-deb

piuparts:
	scripts/build-deb --piuparts

# The benchmark suite: one table, bench/results.md and bench/unlock.png. Needs root (a
# private dockerd). One part alone: make bench BENCH_ARGS="--only unlock --runs 3"
bench: venv
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) run .mypy_cache .pytest_cache .ruff_cache build dist
