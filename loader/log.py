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
    """Blanks out of text the secrets the process has seen lately.

    It keeps the `limit` secrets seen most recently (a token, a fragment or a password is
    seen again each time it is used): an old token is dead and no longer said anywhere, and
    a daemon that runs for months must not grow a list of them.
    """

    def __init__(self, limit: int = 64) -> None:
        self._limit = limit
        self._seen: dict[str | bytes, None] = {}  # in the order last seen
        self._forms: tuple[str, ...] = ()  # longest first
        self._lock = threading.Lock()

    def add(self, secret: str | bytes) -> None:
        with self._lock:
            if secret in self._seen:
                del self._seen[secret]
                self._seen[secret] = None
                return
            self._seen[secret] = None
            while len(self._seen) > self._limit:
                del self._seen[next(iter(self._seen))]
            forms = {form for seen in self._seen for form in _forms(seen)}
            self._forms = tuple(sorted(forms, key=len, reverse=True))

    def __len__(self) -> int:
        return len(self._seen)

    def __call__(self, text: str) -> str:
        for secret in self._forms:
            if secret in text:
                text = text.replace(secret, _REDACTED)
        return text


def _forms(secret: str | bytes) -> set[str]:
    """How a secret shows in text; shorter forms would blank out ordinary words."""
    forms = (
        {secret.hex(), secret.decode("utf-8", "replace"), repr(secret)}
        if isinstance(secret, bytes)
        else {secret, repr(secret)}
    )
    return {form for form in forms if len(form) >= _MIN_SECRET_LENGTH}


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
