"""Log lines: journald's level prefixes, one record per event, secrets redacted."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from loader import log as logs


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    out = io.StringIO()
    yield out
    root.handlers[:], _ = saved
    root.setLevel(saved[1])


def test_levels_carry_journald_prefixes(stream: io.StringIO) -> None:
    logs.setup("debug", logs.Redactor(), stream)
    logger = logging.getLogger("loader.test")
    logger.debug("d")
    logger.info("i")
    logger.warning("w")
    logger.error("e")
    assert stream.getvalue().splitlines() == [
        "<7>loader.test: d",
        "<6>loader.test: i",
        "<4>loader.test: w",
        "<3>loader.test: e",
    ]


def test_level_setting_filters(stream: io.StringIO) -> None:
    logs.setup("warning", logs.Redactor(), stream)
    logging.getLogger("loader.test").info("hidden")
    assert stream.getvalue() == ""


def test_a_traceback_keeps_the_prefix_on_every_line(stream: io.StringIO) -> None:
    logs.setup("info", logs.Redactor(), stream)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("loader.test").exception("failed")
    lines = stream.getvalue().splitlines()
    assert len(lines) > 2
    assert all(line.startswith("<3>") for line in lines)


def test_secrets_are_redacted_in_any_form(stream: io.StringIO) -> None:
    redact = logs.Redactor()
    redact.add("hunter2-password")
    redact.add(b"\x01fragment-bytes")
    logs.setup("info", redact, stream)
    logger = logging.getLogger("loader.test")
    logger.info("password %s", "hunter2-password")
    logger.info("fragment %r", b"\x01fragment-bytes")
    logger.info("hex %s", b"\x01fragment-bytes".hex())
    text = stream.getvalue()
    assert "hunter2" not in text
    assert "fragment-bytes" not in text
    assert b"\x01fragment-bytes".hex() not in text
    assert text.count("[redacted]") == 3


def test_short_values_are_not_treated_as_secrets() -> None:
    redact = logs.Redactor()
    redact.add("ab")
    assert redact("a cab") == "a cab"


def test_the_redactor_keeps_the_secrets_seen_lately_and_no_more() -> None:
    redact = logs.Redactor(limit=8)
    redact.add("the-password")
    for number in range(10_000):  # a token a login, for a long time
        redact.add(f"token-{number:05d}")
        redact.add("the-password")  # in use all along
    assert len(redact) == 8
    assert redact("token-09999 the-password") == "[redacted] [redacted]"
    assert redact("token-00000") == "token-00000"  # long dead, long forgotten


def test_a_longer_secret_is_redacted_before_a_shorter_one_inside_it() -> None:
    redact = logs.Redactor()
    redact.add("secret")
    redact.add("secret-and-more")
    assert redact("x secret-and-more y") == "x [redacted] y"
