"""What a part hands back: rows of the table, notes, and the unlock's time series."""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.harness import DASH, Spread


@dataclass(frozen=True)
class Row:
    """One line of the table. `met` is None where there is no target to meet."""

    key: str
    what: str
    measured: str
    reference: str = "-"
    ratio: str = "-"
    target: str = "-"
    met: bool | None = None
    runs: str = ""  # every run's figures, for the report's appendix


@dataclass(frozen=True)
class UnlockPicture:
    """One unlock over time (seconds since POST /unlock) and the floor it is compared with."""

    archive_size: int
    fed: list[tuple[float, int]]  # bytesDone from /unlock/status
    rss: list[tuple[float, float]]  # the daemon's VmRSS, MB
    wall: float
    floor: Spread


@dataclass
class PartResult:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    picture: UnlockPicture | None = None


def ratio(measured: Spread, reference: Spread) -> str:
    """The ratio of the medians, and the range of the per-run ratios (runs paired in order)."""
    pairs = [m / r for m, r in zip(measured.values, reference.values, strict=False) if r]
    if not pairs or not reference.median:
        return "-"
    return f"{measured.median / reference.median:.2f}x ({min(pairs):.2f}{DASH}{max(pairs):.2f})"


def runs(values: Spread, digits: int = 1) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values.values)
