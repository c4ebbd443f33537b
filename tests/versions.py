"""Prints the versions of the libraries this interpreter actually imports, and from where:
`make unit-debian` runs it so the CI log shows which aiohttp, cryptography, Docker SDK,
requests and sdnotify the unit suite ran on."""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from pathlib import Path


def main() -> None:
    print(f"Python {sys.version.split()[0]} ({sys.executable})")
    for name in (
        "aiohttp",
        "cryptography",
        "docker",
        "requests",
        "urllib3",
        "sdnotify",
        "prometheus_client",
    ):
        module = importlib.import_module(name)
        # sdnotify's own __version__ lags its release (0.3.1 says 0.3.0): the metadata is the
        # package's version; both are shown when they differ.
        released = importlib.metadata.version(name)
        own = getattr(module, "__version__", released)
        shown = released if own == released else f"{released} (__version__ {own})"
        print(f"{name} {shown} from {Path(module.__file__ or '?').parent.parent}")


if __name__ == "__main__":
    main()
