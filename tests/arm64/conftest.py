"""The booted-system fixtures (the session's scratch space, the .debs, the host's emulator),
for the arm64 tests that `make test-arm64` runs apart from the default run."""

from tests.system.conftest import emulator_url, packages, work_dir  # noqa: F401
