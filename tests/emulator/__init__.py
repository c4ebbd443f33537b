"""An emulator of the Azaion Resource API and its CDN, with faults on demand.

Run it with ``python -m tests.emulator --help``; tests build it in-process with
``make_app(Emulator(EmulatorConfig(...)))``.
"""

from .config import EmulatorConfig
from .emulator import Emulator, Stats
from .faults import FaultKind, FaultRates, FaultRule
from .gates import Gate
from .server import make_app

__all__ = [
    "Emulator",
    "EmulatorConfig",
    "FaultKind",
    "FaultRates",
    "FaultRule",
    "Gate",
    "Stats",
    "make_app",
]
