"""Serving the app on its Unix socket: systemd's, or one we bind; readiness; graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import inspect
import logging
import os
import signal
import socket
import stat
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from aiohttp import web

from loader.app import AccessLogger, make_app
from loader.errors import ServerError
from loader.log import Redactor
from loader.settings import Settings
from loader.systemd import Notifier, inherited_socket

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660
_PROBE_TIMEOUT = 1.0


async def serve(settings: Settings, env: MutableMapping[str, str], redact: Redactor) -> None:
    """Serve until SIGTERM or SIGINT, then let requests in flight finish within the grace."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    notifier = Notifier(env, redact)
    sock = inherited_socket(env)
    owned: _OwnedSocket | None = None
    if sock is None:
        owned = _OwnedSocket.bind(settings.socket_path)
        sock = owned.sock
        where = f"{settings.socket_path}"
    else:
        where = f"{sock.getsockname() or 'the socket'} (from systemd)"

    runner = make_runner(make_app(settings, redact, notifier), settings)
    watchdog: asyncio.Task[None] | None = None
    try:
        await runner.setup()
        site = make_site(runner, sock, settings)
        await site.start()
        # What start-up made lives as long as the process: keep it out of every collection,
        # which would otherwise pause the loop for ~10 ms now and then (bench/ row 9b).
        gc.freeze()
        log.info("serving on %s", where)
        notifier.ready("Serving")
        watchdog = asyncio.create_task(notifier.watchdog())
        await stop.wait()
        log.info(
            "stopping: letting requests in flight finish (at most %.0f s)", settings.shutdown_grace
        )
        notifier.stopping()
    finally:
        if watchdog is not None:
            watchdog.cancel()
        await runner.cleanup()
        if owned is not None:
            owned.remove()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    log.info("stopped")


def make_runner(app: web.Application, settings: Settings) -> web.AppRunner:
    return web.AppRunner(
        app,
        handle_signals=False,
        access_log_class=AccessLogger,
        **_runner_grace(settings.shutdown_grace),
    )


def make_site(runner: web.AppRunner, sock: socket.socket, settings: Settings) -> web.SockSite:
    return web.SockSite(runner, sock, **_site_grace(settings.shutdown_grace))


# aiohttp 3.9 moved the shutdown grace from the site to the runner (aio-libs/aiohttp#7718);
# Debian 12 ships 3.8.4, where the runner refuses it.
_GRACE_ON_RUNNER = "shutdown_timeout" in inspect.signature(web.BaseRunner.__init__).parameters


def _runner_grace(seconds: float) -> dict[str, Any]:
    return {"shutdown_timeout": seconds} if _GRACE_ON_RUNNER else {}


def _site_grace(seconds: float) -> dict[str, Any]:
    return {} if _GRACE_ON_RUNNER else {"shutdown_timeout": seconds}


class _OwnedSocket:
    """A socket we bound ourselves: mode 0660, and its file removed when we stop."""

    def __init__(self, path: Path, sock: socket.socket) -> None:
        self.path = path
        self.sock = sock
        self._inode = os.stat(path).st_ino

    @classmethod
    def bind(cls, path: Path) -> _OwnedSocket:
        _clear_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # The umask is process-wide, but nothing else runs yet: the file is never wider than 0660.
        old_umask = os.umask(0o777 & ~SOCKET_MODE)
        try:
            sock.bind(str(path))
        except OSError as exc:
            sock.close()
            raise ServerError(f"cannot bind {path}: {exc.strerror}") from None
        finally:
            os.umask(old_umask)
        os.chmod(path, SOCKET_MODE)
        sock.listen(128)
        sock.set_inheritable(False)
        return cls(path, sock)

    def remove(self) -> None:
        # Unlink only the file we made: a successor may already have bound the path anew.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)


def _clear_stale(path: Path) -> None:
    """Remove a socket file nobody answers on; refuse when a live daemon does."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ServerError(f"cannot use {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise ServerError(f"{path} exists and is not a socket: not touching it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(_PROBE_TIMEOUT)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing the stale socket %s", path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.ETIMEDOUT) or isinstance(exc, TimeoutError):
            raise ServerError(f"{path} is taken by a live process that is not answering") from None
        raise ServerError(f"cannot probe {path}: {exc.strerror or exc}") from None
    finally:
        probe.close()
    raise ServerError(f"another azaion-loader is already serving on {path}")
