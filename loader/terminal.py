"""Progress for people: a bar redrawn in place on a terminal, plain lines elsewhere."""

from __future__ import annotations

import time
from typing import TextIO


class ProgressBar:
    """A bar redrawn in place on a terminal; elsewhere one line per stage or per 10%."""

    def __init__(self, stream: TextIO, what: str) -> None:
        self._stream = stream
        self._what = what
        self._tty = stream.isatty()
        self._stage = ""
        self._tenth = -1
        self._start = time.monotonic()
        self._drawn = False

    def update(self, stage: str, done: int, total: int, fraction: float | None = None) -> None:
        """`done` of `total` bytes; `fraction` of the work, when bytes do not tell it."""
        if fraction is None and total:
            fraction = done / total
        if self._tty:
            self._draw(stage, done, total, fraction)
            return
        tenth = int(fraction * 10) if total and fraction is not None else -1
        if stage != self._stage or tenth > self._tenth:
            percent = f" {tenth * 10}%" if total else ""
            print(f"{self._what}: {stage}{percent}", file=self._stream, flush=True)
        self._stage, self._tenth = stage, tenth

    def finish(self, message: str) -> None:
        if self._tty and self._drawn:
            self._stream.write("\r\033[K")
        print(f"{self._what}: {message}", file=self._stream, flush=True)

    def _draw(self, stage: str, done: int, total: int, fraction: float | None) -> None:
        import shutil

        width = shutil.get_terminal_size((80, 24)).columns
        elapsed = max(time.monotonic() - self._start, 1e-6)
        rate = done / elapsed
        if total and fraction is not None:
            fraction = min(fraction, 1.0)
            left = elapsed * (1 - fraction) / fraction if fraction > 0 else 0
            text = (
                f" {fraction * 100:5.1f}% {_size(done)}/{_size(total)} "
                f"{_size(rate)}/s {_clock(left)} left  {stage}"
            )
            bar_width = max(10, width - len(text) - 3)
            filled = int(bar_width * fraction)
            line = "[" + "#" * filled + "." * (bar_width - filled) + "]" + text
        else:
            line = f"{stage} {_size(done)}"
        self._stream.write("\r" + line[: width - 1] + "\033[K")
        self._stream.flush()
        self._drawn = True


def _size(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1000
    return f"{count:.1f} GB"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
