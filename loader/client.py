"""The client side of the socket, for the CLI: one session, and errors that speak to a
person (what to do when the socket is missing, refused or the daemon hung up)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from loader.settings import SOCKET_PATH

DEFAULT_SOCKET = str(SOCKET_PATH)


class Unreachable(Exception):
    """The daemon's socket cannot be used; the message tells a person what to do."""


class Failed(Exception):
    """The daemon answered with an error; the message is its detail."""


class Daemon:
    """One client session on the socket, with errors that speak to a person."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=socket_path),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300),
        )

    async def __aenter__(self) -> Daemon:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._session.close()

    @contextlib.asynccontextmanager
    async def request(self, method: str, path: str, **kwargs: Any) -> AsyncIterator[Any]:
        try:
            async with self._session.request(method, "http://loader" + path, **kwargs) as resp:
                if resp.status >= 400:
                    raise Failed(await _detail(resp))
                yield resp
        except aiohttp.ClientConnectorError as exc:
            raise Unreachable(_unreachable(self.socket_path, exc.os_error)) from None
        except aiohttp.ServerDisconnectedError:
            raise Unreachable(f"the daemon at {self.socket_path} hung up") from None

    async def json(self, method: str, path: str, **kwargs: Any) -> Any:
        async with self.request(method, path, **kwargs) as resp:
            return await resp.json()


async def _detail(resp: aiohttp.ClientResponse) -> str:
    try:
        body = await resp.json(content_type=None)
        detail = body.get("detail") if isinstance(body, dict) else None
    except (ValueError, aiohttp.ClientError):
        detail = None
    return str(detail) if detail else f"the daemon answered HTTP {resp.status}"


def _unreachable(socket_path: str, error: OSError) -> str:
    if isinstance(error, PermissionError):
        return (
            f"permission denied on {socket_path}: join the azaion-loader group "
            "(sudo usermod -aG azaion-loader $USER, then log in again)"
        )
    from loader.doctor import socket_unit_state

    reason = "no such socket" if isinstance(error, FileNotFoundError) else error.strerror
    hint = ""
    if socket_path == DEFAULT_SOCKET and (state := socket_unit_state()) is not None:
        hint = (
            f"; azaion-loader.socket is {state}: "
            "start it with `sudo systemctl start azaion-loader.socket`"
        )
    else:
        hint = "; is the daemon running (`azaion-loader serve`) with LOADER_SOCKET set to it?"
    return f"cannot reach the daemon at {socket_path}: {reason}{hint}"
