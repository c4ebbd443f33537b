# Every step that CI runs is a target here, so local equals CI. ./dev installs system packages first.
VENV   ?= .venv
PYTHON ?= python3
BIN     = $(VENV)/bin
SOURCES = loader tests bench

.PHONY: run test check unit unit-debian test-arm64 venv clean deb piuparts bench

venv: $(VENV)/.installed

# Python >= 3.10 with venv; the dev extras take current releases from PyPI.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# A second venv on Debian 12's own python3 and its python3-aiohttp, -cryptography, -docker,
# -prometheus-client, -sdnotify and -requests (./dev test installs them), the versions the .deb runs on. Everything
# that python3 already has is pinned, so pip adds the test tools and upgrades nothing of Debian's.
DEBIAN_PYTHON ?= /usr/bin/python3
DEBIAN_VENV   ?= .venv-debian
DEBIAN_BIN     = $(DEBIAN_VENV)/bin

$(DEBIAN_VENV)/.installed: pyproject.toml
	rm -rf $(DEBIAN_VENV)
	$(DEBIAN_PYTHON) -m venv --system-site-packages $(DEBIAN_VENV)
	$(DEBIAN_BIN)/pip freeze --all >$(DEBIAN_VENV)/debian.txt
	$(DEBIAN_BIN)/pip install --quiet -c $(DEBIAN_VENV)/debian.txt pytest pytest-aiohttp hypothesis schemathesis
	$(DEBIAN_BIN)/pip install --quiet --no-deps -e .
	touch $@

run: venv
	scripts/run-dev

check: venv
	$(BIN)/ruff format --check $(SOURCES)
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/mypy $(SOURCES)
	shellcheck dev scripts/run-dev scripts/build-deb scripts/debian-root scripts/ubuntu-libs packaging/debian/azaion-loader.postrm
	# The unit's exposure, in tenths: 15 is 1.5 (docker.service scores 9.6).
	systemd-analyze security --offline=true --threshold=15 --no-pager systemd/azaion-loader.service >/dev/null

unit: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The unit suite on Debian's libraries: all but tests/system, which boots the .deb on them
# already. docker 5.0.3 compares API versions with distutils' StrictVersion, which warns.
DEBIAN_DESELECT = --ignore=tests/system

unit-debian: $(DEBIAN_VENV)/.installed
	$(DEBIAN_BIN)/python -m tests.versions
	$(DEBIAN_BIN)/python -m pytest $(DEBIAN_DESELECT) \
		-W "ignore:distutils Version classes are deprecated:DeprecationWarning" $(PYTEST_ARGS)

test: check unit unit-debian

# The .deb on a booted arm64 Debian 12 under qemu-user-static (root; ./dev installs it).
# Not part of `make test`: pytest ignores tests/arm64 unless it is named.
test-arm64: venv
	$(BIN)/python -m pytest tests/arm64 $(PYTEST_ARGS)

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
	rm -rf $(VENV) $(DEBIAN_VENV) run .mypy_cache .pytest_cache .ruff_cache build dist
