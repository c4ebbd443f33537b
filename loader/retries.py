"""Trying a remote call again: how many attempts, how long between them (exponential backoff
with full jitter), and the error once none is left. The one place retries are decided; what
a failure is, and what to resend, stay with the calls in `remote.py`."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Iterator

from loader.errors import LoaderError, RemoteUnavailable
from loader.metrics import Metrics

log = logging.getLogger(__name__)

_BACKOFF_BASE = 0.25
_BACKOFF_CAP = 8.0


class Attempts:
    """The attempts at one remote call, the one place retries are decided: iterate for each
    attempt; after a failure in transit or a 5xx, `failed` waits an exponential backoff with
    full jitter before the next, counting it as retried, or raises once none is left."""

    def __init__(self, total: int, remote: str, metrics: Metrics) -> None:
        self.total = total
        self.remote = remote
        self._metrics = metrics
        self.number = 0

    def __iter__(self) -> Iterator[int]:
        for number in range(1, self.total + 1):
            self.number = number
            yield number

    @property
    def last(self) -> bool:
        return self.number >= self.total

    async def retry_or_raise(self, doing: str, exc: Exception, gave_up: str) -> None:
        """`doing` failed in transit, or the CDN sent a 5xx (`CdnFailing`): wait for the next
        attempt or, after the last, raise the CDN's refusal or RemoteUnavailable(`gave_up`)."""
        if self.last:
            raise last_error(exc, gave_up) from None
        await self.pause(doing, describe(exc))

    async def pause(self, doing: str, reason: str) -> None:
        """Before the next attempt, after `doing` failed for `reason`."""
        self._metrics.remote_call(self.remote, "retried")
        delay = backoff(self.number)
        log.warning(
            "%s failed (%s), attempt %d of %d; retrying in %.2f s",
            doing,
            reason,
            self.number,
            self.total,
            delay,
        )
        await asyncio.sleep(delay)


class CdnFailing(Exception):
    """A 5xx from the CDN: retried like a failure in transit, then `refusal` is raised."""

    def __init__(self, refusal: LoaderError) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


def last_error(exc: Exception, unreachable: str) -> LoaderError:
    """The error of a CDN call's last attempt: the CDN's refusal (a 5xx), or `unreachable`."""
    if isinstance(exc, CdnFailing):
        return exc.refusal
    return RemoteUnavailable(f"{unreachable}: {describe(exc)}")


def backoff(attempt: int) -> float:
    """Exponential backoff with full jitter."""
    return random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2**attempt))


def describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
