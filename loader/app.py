"""The aiohttp application: its long-lived parts, its error middleware and its access log."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import TypeVar

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from loader import __version__
from loader.cache import ModelCache
from loader.errors import LoaderError
from loader.images import Docker
from loader.log import Redactor
from loader.metrics import Metrics
from loader.peers import Peer, check_allowed, peer_of
from loader.remote import ResourceAPI
from loader.resources import Resources
from loader.routes import (
    API,
    DOCKER,
    METRICS,
    NOTIFIER,
    REDACT,
    RESOURCES,
    SETTINGS,
    UNLOCKER,
    routes,
)
from loader.settings import Settings
from loader.systemd import Notifier
from loader.unlock import Unlocker

log = logging.getLogger(__name__)

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# JSON bodies are a few hundred bytes; uploads are streamed and not bound by this.
MAX_JSON_BODY = 64 * 1024


def _request_key(name: str, kind: type[T]) -> web.RequestKey[T]:
    factory = getattr(web, "RequestKey", None)  # aiohttp >= 3.11
    return factory(name, kind) if factory else name  # type: ignore[return-value]


# The request's caller, set by caller_middleware.
PEER = _request_key("peer", Peer)

# FastAPI's words for the router's own refusals, which callers of the first loader saw.
_HTTP_CODES = {
    400: ("bad-request", "Bad Request"),
    404: ("not-found", "Not Found"),
    405: ("method-not-allowed", "Method Not Allowed"),
    413: ("payload-too-large", "Request body too large"),
}


def make_app(settings: Settings, redact: Redactor, notifier: Notifier) -> web.Application:
    app = web.Application(
        middlewares=[error_middleware, caller_middleware], client_max_size=MAX_JSON_BODY
    )
    app[SETTINGS] = settings
    app[REDACT] = redact
    app[NOTIFIER] = notifier
    app[METRICS] = Metrics()
    app.cleanup_ctx.append(_resource_api)
    app.cleanup_ctx.append(_docker)
    app.on_shutdown.append(_stop_unlock)
    app.add_routes(routes)
    return app


# OpenSSL's name for a CA in a hashed folder: the subject's hash, a dot, a number.
_HASH_LINK = re.compile(r"[0-9a-f]{8}\.[0-9]+")


def client_tls(
    ca_file: Path | None, capath: str | None = None, env: Mapping[str, str] = os.environ
) -> ssl.SSLContext:
    """What every call to the Resource API and the CDN verifies with: the system's CAs, and
    TLS_CA_FILE's. Always a context of our own: aiohttp 3.8 (Debian 12's) reads ssl=True as
    "do not verify" (only its default, None, verifies), 3.9+ as "verify".

    The system's CAs come from OpenSSL's hashed folder (/etc/ssl/certs on Debian), each read
    when a handshake needs it, not the whole bundle parsed at start: the socket is served
    50 ms sooner (bench/ row 10). Where SSL_CERT_FILE or SSL_CERT_DIR is set, or the folder
    holds no hash links, ssl.create_default_context() loads OpenSSL's defaults as usual.
    """
    paths = ssl.get_default_verify_paths()
    folder = capath or paths.openssl_capath
    if (
        env.get(paths.openssl_cafile_env)
        or env.get(paths.openssl_capath_env)
        or not _has_hash_links(folder)
    ):
        tls = ssl.create_default_context()
    else:
        tls = ssl.create_default_context(capath=folder)
    if ca_file is not None:
        tls.load_verify_locations(cafile=str(ca_file))
    return tls


def _has_hash_links(folder: str) -> bool:
    try:
        with os.scandir(folder) as entries:
            return any(_HASH_LINK.fullmatch(entry.name) for entry in entries)
    except OSError:
        return False


async def _resource_api(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    connector = aiohttp.TCPConnector(limit=32, ssl=client_tls(settings.tls_ca_file))
    async with aiohttp.ClientSession(
        connector=connector,
        headers={"User-Agent": f"azaion-loader/{__version__}"},
        raise_for_status=False,
    ) as session:
        metrics = app[METRICS]
        api = ResourceAPI(session, settings, app[REDACT], metrics)
        app[API] = api
        cache = ModelCache(settings.model_cache_dir)
        # Before the socket is served: later, a request's live spool could look like debris.
        await asyncio.to_thread(cache.remove_debris)
        metrics.cache = cache
        resources = Resources(settings, api, cache, metrics)
        app[RESOURCES] = resources
        yield
        # Downloads nobody waits for any more must end before the session closes under them.
        await resources.close()


async def _docker(app: web.Application) -> AsyncIterator[None]:
    docker = Docker(app[SETTINGS].docker_host)
    app[DOCKER] = docker
    status = app[NOTIFIER].status  # systemd's STATUS=
    unlocker = Unlocker(app[SETTINGS], app[API], docker, status, app[REDACT], app[METRICS])
    app[UNLOCKER] = app[METRICS].unlocker = unlocker
    yield
    await asyncio.to_thread(docker.close)


async def _stop_unlock(app: web.Application) -> None:
    await app[UNLOCKER].stop(app[SETTINGS].shutdown_grace)


def error_body(status: int, code: str, detail: str) -> web.Response:
    return web.json_response({"detail": detail, "code": code}, status=status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place where errors become answers, `{"detail": ..., "code": ...}`; no traceback."""
    redact = request.app[REDACT]
    try:
        return await handler(request)
    except LoaderError as exc:
        if exc.status >= 500:
            log.warning("%s %s: %s", request.method, request.path, exc.message)
        return _unread_closes(request, error_body(exc.status, exc.code, redact(exc.message)))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code, detail = _HTTP_CODES.get(exc.status, ("http-error", exc.reason))
        answer = error_body(exc.status, code, detail)
        if exc.status == 405:
            answer.headers["Allow"] = exc.headers.get("Allow", "")
        return _unread_closes(request, answer)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return _unread_closes(
            request, error_body(500, "internal-error", "internal error: see the daemon's log")
        )


def _unread_closes(request: web.Request, answer: web.Response) -> web.Response:
    """A refusal sent before the body was read closes the connection: aiohttp 3.8 (Debian 12's)
    took the rest of that body as the connection's next request ("Bad status line")."""
    if not request.content.is_eof():
        answer.force_close()
    return answer


@web.middleware
async def caller_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Who calls (SO_PEERCRED), for the access log; refused with 403 if ALLOWED_* say so."""
    peer = peer_of(request)
    if peer is not None:
        request[PEER] = peer
    check_allowed(request.app[SETTINGS], peer)
    return await handler(request)


class AccessLogger(AbstractAccessLogger):
    """One line per request, naming the calling process: debug level, or info when it failed."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        level = logging.INFO if response.status >= 400 else logging.DEBUG
        if self.logger.isEnabledFor(level):
            self.logger.log(
                level,
                '%s "%s %s" %d %d %.1fms',
                request.get(PEER) or "peer=?",
                request.method,
                request.path,
                response.status,
                response.body_length,
                time * 1000,
            )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.DEBUG) or self.logger.isEnabledFor(logging.INFO)
