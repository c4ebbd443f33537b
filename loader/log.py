"""Logging to stderr, one line per event, with journald's level prefixes and secrets redacted."""

from __future__ import annotations

import logging
import sys
import threading
from typing import TextIO

# sd-daemon(3): "<3>" error ... "<7>" debug; journald strips the prefix and keeps the priority.
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}
_REDACTED = "[redacted]"
# Shorter values would blank out ordinary words; they are too weak to be secrets worth hiding.
_MIN_SECRET_LENGTH = 4


class Redactor:
    """Remembers every secret the process has seen and blanks them out of text."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()
        self._lock = threading.Lock()

    def add(self, secret: str | bytes) -> None:
        forms = (
            {secret.hex(), secret.decode("utf-8", "replace"), repr(secret)}
            if isinstance(secret, bytes)
            else {secret, repr(secret)}
        )
        with self._lock:
            self._secrets.update(f for f in forms if len(f) >= _MIN_SECRET_LENGTH)

    def __call__(self, text: str) -> str:
        with self._lock:
            secrets = sorted(self._secrets, key=len, reverse=True)
        for secret in secrets:
            if secret in text:
                text = text.replace(secret, _REDACTED)
        return text


class JournalFormatter(logging.Formatter):
    """`<6>logger: message`; a traceback stays on the same record, its lines prefixed too."""

    def __init__(self, redact: Redactor, *, prefix: bool) -> None:
        super().__init__("%(name)s: %(message)s")
        self._redact = redact
        self._prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        text = self._redact(super().format(record))
        if not self._prefix:
            return "\n".join(f"{record.levelname:<7} {line}" for line in text.splitlines())
        priority = _PRIORITY.get(record.levelno, 6)
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines())


def setup(level: str, redact: Redactor, stream: TextIO | None = None) -> None:
    """Send every log record to stderr: journald's prefixes, unless a person is watching a tty."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JournalFormatter(redact, prefix=not stream.isatty()))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
