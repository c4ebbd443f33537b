"""The version lives in loader/__init__.py; the Debian changelog must say the same."""

from __future__ import annotations

import re
from pathlib import Path

from loader import __version__

CHANGELOG = Path(__file__).resolve().parents[2] / "packaging" / "debian" / "changelog"


def test_changelog_version_is_the_package_version() -> None:
    first = CHANGELOG.read_text().splitlines()[0]
    found = re.fullmatch(r"azaion-loader \(([^)]+)\) \S+; urgency=\w+", first)
    assert found, f"unexpected first line of {CHANGELOG}: {first!r}"
    assert found.group(1) == __version__
