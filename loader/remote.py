"""The client of the Resource API and its CDN (contracts/resource-api.md).

It holds the daemon's credentials and bearer token in memory only, logs in again
once on a 401, and retries idempotent calls that failed in transit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from loader.errors import (
    LoaderError,
    NotAuthenticated,
    RemoteNotFound,
    RemoteRefused,
    RemoteUnavailable,
    RemoteUntrusted,
    WrongCredentials,
)
from loader.integrity import RECORD_SUFFIX
from loader.log import Redactor
from loader.metrics import Metrics
from loader.retries import Attempts, CdnFailing, describe
from loader.settings import Settings

log = logging.getLogger(__name__)

# Errors the remote's answer may carry; more is not worth reading into memory.
_MAX_ERROR_BODY = 4096
# The last two AES blocks of a blob tell its padding, hence the plaintext's size.
TAIL = 32
# What one read of an answer's body asks for, and one read of a big part's file to PUT.
NETWORK_READ = 256 * 1024
FILE_READ = 1024 * 1024
# Failures in transit: the request may not have reached the remote, or its answer was lost.
_TRANSIENT = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError)


@dataclass(frozen=True)
class Credentials:
    email: str
    password: str

    def __repr__(self) -> str:
        return f"Credentials(email={self.email!r}, password=[redacted])"


class ResourceAPI:
    """Login, key fragments and resource parts, over one aiohttp ClientSession."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: Settings,
        redact: Redactor,
        metrics: Metrics | None = None,
    ) -> None:
        self._session = session
        self._settings = settings
        self._redact = redact
        self._metrics = metrics or Metrics()
        self._credentials: Credentials | None = None
        self._token: str | None = None
        self._login_lock = asyncio.Lock()
        # Set once the CDN has refused a chunked PUT and taken the same bytes with a length.
        self.chunked_refused = False
        self._api_timeout = aiohttp.ClientTimeout(
            total=settings.api_timeout, sock_connect=settings.connect_timeout
        )
        # Big transfers: no limit on the whole, only on each silence.
        self._transfer_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=settings.connect_timeout, sock_read=settings.read_timeout
        )

    @property
    def authenticated(self) -> bool:
        return self._token is not None

    async def login(self, email: str, password: str) -> None:
        """Log in; on success these credentials become the daemon's. WrongCredentials if refused."""
        credentials = Credentials(email, password)
        async with self._login_lock:
            self._token = await self._fetch_token(credentials)
            self._credentials = credentials
        log.info("logged in to the Resource API as %s", email)

    async def fetch_archive_fragment(self) -> bytes:
        """The fragment that unlocks the image archive (the binary split)."""
        return await self._fetch_fragment("/binary-split/key-fragment")

    async def fetch_resource_fragment(self) -> bytes:
        """The fragment that encrypts and decrypts resources."""
        return await self._fetch_fragment("/resources/key-fragment")

    async def reach(self, cdn: bool = False) -> str | None:
        """One HEAD of the Resource API's (or the CDN's) base URL, not retried, with the
        session's TLS settings: any HTTP answer means reachable. Returns its Date header."""
        url = (self._settings.cdn_url if cdn else self._settings.resource_api_url) + "/"
        where = "the CDN" if cdn else "the Resource API"
        try:
            async with self._session.head(
                url, timeout=self._api_timeout, allow_redirects=False
            ) as resp:
                return resp.headers.get("Date")
        except aiohttp.ClientSSLError as exc:
            raise _untrusted(where, exc) from None
        except _TRANSIENT as exc:
            raise RemoteUnavailable(f"could not reach {where} at {url}: {describe(exc)}") from None

    async def fetch_small_part(self, folder: str, name: str) -> bytes:
        """`NAME.small` from the API; RemoteNotFound when it has none."""
        return await self.call(
            "POST",
            f"/resources/get/{folder}",
            what=f"the small part of {folder}/{name}",
            json={"fileName": f"{name}.small"},
        )

    async def fetch_integrity_record(self, folder: str, name: str) -> bytes | None:
        """The small part of `NAME.integrity`; None when the API has none."""
        try:
            return await self.call(
                "POST",
                f"/resources/get/{folder}",
                what=f"the integrity record of {folder}/{name}",
                json={"fileName": f"{name}{RECORD_SUFFIX}.small"},
            )
        except RemoteNotFound:
            return None

    async def upload_integrity_record(self, folder: str, name: str, record: bytes) -> None:
        await self.upload_small_part(
            folder, name + RECORD_SUFFIX, record, what=f"the integrity record of {folder}/{name}"
        )

    async def upload_small_part(
        self, folder: str, name: str, part: bytes, what: str | None = None
    ) -> None:
        body, content_type = _multipart_file("data", f"{name}.small", part)
        await self.call(
            "POST",
            f"/resources/{folder}",
            what=f"the upload of {what or f'the small part of {folder}/{name}'}",
            idempotent=False,
            statuses=(200, 201),
            data=body,
            headers={"Content-Type": content_type},
        )

    async def put_big_part(
        self,
        folder: str,
        name: str,
        body: Callable[[], AsyncIterator[bytes]],
        size: int | None,
    ) -> None:
        """PUT `NAME.big` to the CDN, its bytes from `body()` (called anew for each attempt):
        with a Content-Length of `size`, or chunked when `size` is None. A chunked PUT that the
        CDN refuses as such (411 Length Required, or 501 for a transfer coding it does not
        implement) raises ChunkedRefused: it may take the same bytes with a length."""
        url = f"{self._settings.cdn_url}/{folder}/{name}.big"
        what = f"the upload of the big part of {folder}/{name}"
        headers = {"Content-Type": "application/octet-stream"}
        if size is not None:
            headers["Content-Length"] = str(size)
        status, answer = await self._authorized(
            "PUT",
            url,
            what=what,
            idempotent=False,
            timeout=self._transfer_timeout,
            data=body,
            headers=headers,
        )
        if status in (200, 201, 204):
            return
        refusal = self._refusal(status, answer, "the CDN", what)
        if size is None and status in (411, 501):
            raise ChunkedRefused(f"the CDN refused a chunked PUT: HTTP {status}") from refusal
        raise refusal

    async def big_part_tail(self, folder: str, name: str) -> tuple[int, bytes]:
        """The big part's size and its last 32 bytes (fewer when it is shorter), by a Range GET."""
        url = f"{self._settings.cdn_url}/{folder}/{name}.big"
        what = f"the big part of {folder}/{name}"
        attempts = self._attempts("cdn")
        try:
            for _ in attempts:
                try:
                    async with self._cdn_get(url, what, f"bytes=-{TAIL}") as resp:
                        if resp.status == 206:
                            body = await resp.read()
                            total = _total_size(resp, None)
                        else:  # the CDN ignored the Range: read through, keep the end
                            body = await _last_bytes(resp, TAIL)
                            total = resp.content_length
                    if total is None:
                        raise RemoteRefused(f"the CDN did not tell the size of {what}")
                    self._metrics.remote_call("cdn", "ok")
                    return total, body[-TAIL:]
                except aiohttp.ClientSSLError as exc:
                    raise _untrusted("the CDN", exc) from None
                except (*_TRANSIENT, CdnFailing) as exc:
                    gave_up = f"could not reach the CDN for {what}"
                    await attempts.retry_or_raise(f"GET of {what}", exc, gave_up)
        except LoaderError as exc:
            self._count_failure("cdn", exc)
            raise
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def stream_big_part(
        self, folder: str, name: str, offset: int = 0
    ) -> AsyncIterator[bytes]:
        """The big part from the CDN, from `offset`, resuming with Range after a cut."""
        url = f"{self._settings.cdn_url}/{folder}/{name}.big"
        what = f"the big part of {folder}/{name}"
        attempts = self._attempts("cdn")
        total: int | None = None
        try:
            for _ in attempts:
                ranged = f"bytes={offset}-" if offset else None
                try:
                    async with self._cdn_get(url, what, ranged) as resp:
                        if resp.status == 200 and offset:
                            raise RemoteRefused(
                                f"the CDN ignored a Range request for {what} while resuming "
                                f"at byte {offset}: cannot resume"
                            )
                        size = _total_size(resp, None)
                        if total is None:
                            total = size
                        elif size is not None and size != total:
                            raise RemoteRefused(
                                f"the CDN's {what} changed size during the download"
                            )
                        async for chunk in resp.content.iter_chunked(NETWORK_READ):
                            offset += len(chunk)
                            yield chunk
                except aiohttp.ClientSSLError as exc:
                    raise _untrusted("the CDN", exc) from None
                except (*_TRANSIENT, CdnFailing) as exc:
                    cut = f"the CDN's {what} was cut at byte {offset}"
                    await attempts.retry_or_raise(f"GET of {what} from byte {offset}", exc, cut)
                    continue  # resumed from `offset` with a Range
                if total is not None and offset != total:
                    raise RemoteRefused(
                        f"the CDN sent {offset} bytes of {what}, not the {total} it announced"
                    )
                self._metrics.remote_call("cdn", "ok")
                return
        except LoaderError as exc:
            self._count_failure("cdn", exc)
            raise

    def _attempts(self, remote: str, retries: int | None = None) -> Attempts:
        return Attempts(
            1 + (self._settings.api_retries if retries is None else retries), remote, self._metrics
        )

    def _count_failure(self, remote: str, exc: LoaderError) -> None:
        """The last attempt of a call failed: no answer, or an answer that says no."""
        unreachable = isinstance(exc, (RemoteUnavailable, RemoteUntrusted))
        self._metrics.remote_call(remote, "unreachable" if unreachable else "refused")

    @asynccontextmanager
    async def _cdn_get(
        self, url: str, what: str, byte_range: str | None
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """An open 200 or 206 answer of the CDN. Failures in transit, and 5xx as
        `CdnFailing`, are the caller's to retry."""
        headers = {"Range": byte_range} if byte_range else {}
        async with self._session.get(
            url, headers=headers, timeout=self._transfer_timeout, allow_redirects=True
        ) as resp:
            if resp.status not in (200, 206):
                body = await resp.content.read(_MAX_ERROR_BODY)
                refusal = self._refusal(resp.status, body, "the CDN", what)
                raise CdnFailing(refusal) if resp.status >= 500 else refusal
            yield resp

    async def _fetch_fragment(self, path: str) -> bytes:
        fragment = await self.call("GET", path, what="the key fragment")
        if not fragment:
            raise RemoteRefused(f"the Resource API sent an empty key fragment from {path}")
        self._redact.add(fragment)
        return fragment

    async def call(
        self,
        method: str,
        path: str,
        *,
        what: str,
        idempotent: bool = True,
        statuses: tuple[int, ...] = (200,),
        **kwargs: Any,
    ) -> bytes:
        """One authenticated API call whose answer is small; returns the body.

        `what` names the thing asked for, for error messages ("the key fragment").
        """
        url = self._settings.resource_api_url + path
        status, body = await self._authorized(
            method, url, what=what, idempotent=idempotent, **kwargs
        )
        if status not in statuses:
            raise self._refusal(status, body, self._where(url), what)
        return body

    async def _authorized(
        self, method: str, url: str, *, what: str, idempotent: bool, **kwargs: Any
    ) -> tuple[int, bytes]:
        """An exchange with the bearer token; on a 401, log in again once and repeat once."""
        if self._credentials is None or self._token is None:
            raise NotAuthenticated(
                "not logged in: call /login (or /unlock) with the Resource API credentials first"
            )
        extra_headers = kwargs.pop("headers", {})
        for attempt in (1, 2):
            token = self._token
            headers = {**extra_headers, "Authorization": f"Bearer {token}"}
            status, body = await self._exchange(
                method, url, what=what, idempotent=idempotent, headers=headers, **kwargs
            )
            if status != 401:
                return status, body
            if attempt == 1:
                log.info("the Resource API refused our token for %s: logging in again", what)
                await self._relogin(stale=token)
        raise NotAuthenticated(
            f"the Resource API refused our credentials for {what} after a fresh login"
        )

    async def _relogin(self, stale: str | None) -> None:
        async with self._login_lock:
            if self._token != stale:
                return  # another task logged in while we waited
            credentials = self._credentials
            if credentials is None:
                raise NotAuthenticated("not logged in")
            try:
                self._token = await self._fetch_token(credentials)
            except WrongCredentials:
                self._token = None
                raise NotAuthenticated(
                    "the Resource API no longer accepts the daemon's credentials: log in again"
                ) from None

    async def _fetch_token(self, credentials: Credentials) -> str:
        url = self._settings.resource_api_url + "/login"
        body = {"email": credentials.email, "password": credentials.password}
        status, answer = await self._exchange("POST", url, what="login", idempotent=True, json=body)
        if status in (401, 403):
            raise WrongCredentials("wrong email or password")
        if status != 200:
            # Never quoted: a validation error may echo the password it refused (FastAPI's 422
            # does), and a refused password is not among the redactor's secrets.
            raise _refusal(status, "", "the Resource API", "login")
        try:
            token = json.loads(answer).get("token")
        except (ValueError, AttributeError):
            raise RemoteRefused("the Resource API's login answer is not a JSON object") from None
        if not isinstance(token, str) or not token:
            raise RemoteRefused("the Resource API's login answer has no token")
        self._redact.add(token)
        # Only a password that works is a secret worth blanking out: blanking every one tried
        # would let any caller blank any word out of the log. None of them is ever logged.
        self._redact.add(credentials.password)
        return token

    def _refusal(self, status: int, body: bytes, where: str, what: str) -> LoaderError:
        """`_refusal`, quoting the remote's answer through the redactor."""
        detail = body[:_MAX_ERROR_BODY].decode("utf-8", "replace").strip()
        # Redacted whole, then cut: a cut could leave part of a secret the redactor would miss.
        return _refusal(status, self._redact(detail)[:200], where, what)

    def _where(self, url: str) -> str:
        return "the CDN" if url.startswith(self._settings.cdn_url + "/") else "the Resource API"

    async def _exchange(
        self,
        method: str,
        url: str,
        *,
        what: str,
        idempotent: bool,
        timeout: aiohttp.ClientTimeout | None = None,
        **kwargs: Any,
    ) -> tuple[int, bytes]:
        """Status and body of a call with a small answer. Failures in transit and 5xx are
        retried with exponential backoff and jitter when the call is idempotent."""
        remote = "cdn" if self._where(url) == "the CDN" else "api"
        attempts = self._attempts(remote, retries=None if idempotent else 0)
        for _ in attempts:
            try:
                # A callable body is made anew for each attempt (a file is read once).
                body = kwargs.get("data")
                sent = {**kwargs, "data": body()} if callable(body) else kwargs
                async with self._session.request(
                    method,
                    url,
                    timeout=timeout or self._api_timeout,
                    allow_redirects=False,
                    **sent,
                ) as resp:
                    status, body = resp.status, await resp.read()
            except aiohttp.ClientSSLError as exc:
                self._metrics.remote_call(remote, "unreachable")
                raise _untrusted(self._where(url), exc) from None
            except _TRANSIENT as exc:
                if attempts.last:
                    self._metrics.remote_call(remote, "unreachable")
                gave_up = f"could not reach {self._where(url)} for {what}"
                await attempts.retry_or_raise(f"{method} for {what}", exc, gave_up)
                continue
            if status < 500 or attempts.last:
                self._metrics.remote_call(remote, "ok" if status < 400 else "refused")
                return status, body
            await attempts.pause(f"{method} for {what}", f"HTTP {status}")
        raise AssertionError("unreachable: the last attempt returns or raises")


class ChunkedRefused(RemoteRefused):
    """The CDN refused a big part sent chunked (without a Content-Length)."""


async def file_chunks(path: Path) -> AsyncIterator[bytes]:
    """A file in big pieces, each read by a worker thread."""
    # Opened here, not in a worker: a cancel while a worker opens it would leak the file.
    source = open(path, "rb")  # noqa: SIM115, ASYNC230 - closed below
    try:
        while chunk := await asyncio.to_thread(source.read, FILE_READ):
            yield chunk
    finally:
        source.close()


def _multipart_file(field: str, filename: str, data: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body with one file field, as bytes: it can be sent twice."""
    boundary = secrets.token_hex(16)
    head = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    return head + data + tail, f"multipart/form-data; boundary={boundary}"


def _total_size(resp: aiohttp.ClientResponse, default: int | None) -> int | None:
    """The whole object's size: from Content-Range on a 206, else Content-Length."""
    if resp.status == 206:
        total = resp.headers.get("Content-Range", "").rpartition("/")[2]
        return int(total) if total.isdigit() else default
    return resp.content_length if resp.content_length is not None else default


async def _last_bytes(resp: aiohttp.ClientResponse, count: int) -> bytes:
    """The last `count` bytes of a body, read through without keeping the rest."""
    tail = b""
    async for chunk in resp.content.iter_chunked(NETWORK_READ):
        tail = (tail + chunk)[-count:]
    return tail


def _untrusted(where: str, exc: aiohttp.ClientSSLError) -> RemoteUntrusted:
    reason = getattr(exc, "certificate_error", None) or exc
    return RemoteUntrusted(
        f"{where}'s TLS certificate is not trusted ({reason}); if a private CA signs it, "
        "set TLS_CA_FILE to that CA's certificate"
    )


def _refusal(status: int, detail: str, where: str, what: str) -> LoaderError:
    """The error for an answer that is not what the contract promises; a 4xx quotes
    `detail`, which must be redacted already."""
    if status == 404:
        return RemoteNotFound(f"{where} has no {what.removeprefix('the ')} (HTTP 404)")
    if status >= 500:
        return RemoteRefused(f"{where} failed for {what}: HTTP {status}")
    suffix = f": {detail}" if detail else ""
    return RemoteRefused(f"{where} refused {what}: HTTP {status}{suffix}")
