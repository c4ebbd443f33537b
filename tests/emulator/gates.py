"""Gates: requests held until a test opens them, so that "meanwhile" is certain, not timed."""

from __future__ import annotations

import asyncio


class Gate:
    """Holds every request that matches ``method`` and ``path_prefix`` until ``open()``.

    ``held`` counts the requests that reached it, open or not. It lives in the
    emulator's event loop: the tests that run the emulator in their own loop use it.
    """

    def __init__(self, method: str, path_prefix: str) -> None:
        self.method = method
        self.path_prefix = path_prefix
        self.held = 0
        self._opened = asyncio.Event()

    def matches(self, method: str, path: str) -> bool:
        return method.upper() == self.method.upper() and path.startswith(self.path_prefix)

    async def passage(self) -> None:
        self.held += 1
        await self._opened.wait()

    def open(self) -> None:
        self._opened.set()
