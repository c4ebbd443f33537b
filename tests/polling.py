"""Waiting for a condition until a deadline: one rule, a blocking and an event-loop form."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


class Deadline:
    """`timeout` seconds from now, on the monotonic clock."""

    def __init__(self, timeout: float) -> None:
        self.at = time.monotonic() + timeout

    def passed(self) -> bool:
        return time.monotonic() >= self.at


def poll(condition: Callable[[], Any], timeout: float, interval: float = 0.01) -> Any:
    """Call `condition` until its answer is truthy or `timeout` s pass; its last answer.

    Blocks: for threads and processes, not for code on an event loop (see `poll_async`).
    """
    deadline = Deadline(timeout)
    while True:
        answer = condition()
        if answer or deadline.passed():
            return answer
        time.sleep(interval)


async def poll_async(condition: Callable[[], Any], timeout: float, interval: float = 0.01) -> Any:
    """`poll` that lets the event loop run between calls; `condition` may be async."""
    deadline = Deadline(timeout)
    while True:
        answer = condition()
        if asyncio.iscoroutine(answer):
            answer = await answer
        if answer or deadline.passed():
            return answer
        await asyncio.sleep(interval)
