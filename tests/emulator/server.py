"""The route table of the Resource API and CDN emulator, and its fault middleware.

Paths and answers follow contracts/resource-api.md; the CDN lives under /cdn.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from aiohttp import BodyPartReader, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from .emulator import Emulator
from .faults import FaultRates, FaultRule
from .responses import BytesResponse, EmulatedResponse, FilePartResponse, HangUp
from .storage import (
    BIG_SUFFIX,
    MAX_SMALL_PART,
    SMALL_SUFFIX,
    InvalidName,
    check_name,
    split_file_name,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CONTROL_PREFIX = "/_emulator/"
_RATE_FIELDS = frozenset(field.name for field in dataclasses.fields(FaultRates))


class Refused(Exception):
    """A request answered with an error status and a FastAPI-shaped body."""

    def __init__(self, status: int, detail: str, headers: Mapping[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers


def _name(value: str) -> str:
    try:
        return check_name(value)
    except InvalidName as exc:
        raise Refused(400, str(exc)) from None


def _file_name(value: str, suffix: str) -> str:
    try:
        return split_file_name(value, suffix)
    except InvalidName as exc:
        raise Refused(400, str(exc)) from None


async def _json_object(request: web.Request) -> dict[str, object]:
    try:
        data = json.loads(await request.read())
    except ValueError:
        raise Refused(422, "the body is not JSON") from None
    if not isinstance(data, dict):
        raise Refused(422, "the body must be a JSON object")
    return data


def _string_field(body: Mapping[str, object], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str):
        raise Refused(422, f"field {key!r} must be a string")
    return value


def _cdn_target(path: str) -> tuple[str, str]:
    folder, slash, file_name = path.partition("/")
    if not slash or "/" in file_name:
        raise Refused(400, "a CDN path is FOLDER/NAME.big")
    return _name(folder), _file_name(file_name, BIG_SUFFIX)


class _Routes:
    """Thin handlers over one Emulator; bound methods, so the app needs no keys."""

    def __init__(self, emulator: Emulator) -> None:
        self._emulator = emulator

    def table(self) -> list[web.RouteDef]:
        return [
            web.post("/login", self.login),
            web.get("/binary-split/key-fragment", self.archive_fragment),
            web.get("/resources/key-fragment", self.resource_fragment),
            # Before the upload route, which would otherwise take "get/FOLDER" as a folder.
            web.post("/resources/get/{folder:.*}", self.download_small),
            web.post("/resources/{folder:.*}", self.upload_small),
            web.put("/cdn/{path:.*}", self.upload_big),
            web.get("/cdn/{path:.*}", self.download_big),
            web.get(CONTROL_PREFIX + "health", self.health),
            web.get(CONTROL_PREFIX + "faults", self.show_faults),
            web.post(CONTROL_PREFIX + "faults", self.add_faults),
            web.delete(CONTROL_PREFIX + "faults", self.clear_faults),
            web.post(CONTROL_PREFIX + "revoke-tokens", self.revoke_tokens),
            web.get(CONTROL_PREFIX + "stats", self.stats),
            web.delete(CONTROL_PREFIX + "stats", self.reset_stats),
        ]

    @web.middleware
    async def inject_faults(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(CONTROL_PREFIX):
            return await self._answer(request, handler)
        self._emulator.count_request(request.method, request.path)
        await self._emulator.pass_gates(request.method, request.path)
        fault = self._emulator.faults.draw(
            request.method, request.path, has_range=hdrs.RANGE in request.headers
        )
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.kind == "status":
            await _discard_body(request)
            return BytesResponse.json({"detail": "fault injected"}, status=fault.status)
        if fault.kind == "drop":
            return HangUp()
        if fault.kind == "echo":
            return await _echo(request)
        response = await self._answer(request, handler)
        if isinstance(response, EmulatedResponse):
            if fault.kind == "ignore-range":
                response.honour_range = False
            elif fault.kind in ("truncate", "wrong-length"):
                response.spoil(fault.kind, fault.truncate_at)
        if isinstance(response, FilePartResponse) and fault.kind in ("flip-bit", "swap-blocks"):
            response.tamper(fault.kind, fault.offset)
        return response

    async def _answer(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except (ConnectionError, HttpProcessingError):
            return HangUp()  # the client went away, or broke the body's framing, mid-body
        except Refused as exc:
            response = BytesResponse.json(
                {"detail": exc.detail}, status=exc.status, headers=exc.headers
            )
            if self._emulator.config.refuse_early:
                # aiohttp reads and drops the rest of the body after the answer (its
                # lingering close), then closes the connection.
                response.force_close()
                return response
        except web.HTTPException as exc:  # the router's own 404 and 405
            allow = {"Allow": exc.headers[hdrs.ALLOW]} if hdrs.ALLOW in exc.headers else None
            response = BytesResponse.json({"detail": exc.reason}, status=exc.status, headers=allow)
        await _discard_body(request)
        return response

    def _require_token(self, request: web.Request) -> None:
        scheme, _, token = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
        if scheme.lower() != "bearer" or not self._emulator.token_is_valid(token.strip()):
            raise Refused(401, "missing, expired or revoked token", {"WWW-Authenticate": "Bearer"})

    # The Resource API

    async def login(self, request: web.Request) -> web.StreamResponse:
        body = await _json_object(request)
        email, password = _string_field(body, "email"), _string_field(body, "password")
        token = self._emulator.login(email, password)
        if token is None:
            raise Refused(401, "wrong email or password")
        return BytesResponse.json({"token": token})

    async def archive_fragment(self, request: web.Request) -> web.StreamResponse:
        self._require_token(request)
        return BytesResponse(self._emulator.config.archive_fragment)

    async def resource_fragment(self, request: web.Request) -> web.StreamResponse:
        self._require_token(request)
        return BytesResponse(self._emulator.config.resource_fragment)

    async def upload_small(self, request: web.Request) -> web.StreamResponse:
        self._require_token(request)
        folder = _name(request.match_info["folder"])
        if not request.content_type.startswith("multipart/"):
            raise Refused(422, "expected multipart/form-data with a file field 'data'")
        try:
            name, data = await _read_small_upload(request)
        # aiohttp says "malformed" with ValueError, and in 3.8 also AssertionError.
        except (ValueError, AssertionError):
            raise Refused(422, "malformed multipart body") from None
        await self._emulator.store.put_small(folder, name, data)
        return BytesResponse.json({"status": "ok"}, status=201)

    async def download_small(self, request: web.Request) -> web.StreamResponse:
        self._require_token(request)
        folder = _name(request.match_info["folder"])
        name = _file_name(_string_field(await _json_object(request), "fileName"), SMALL_SUFFIX)
        data = await self._emulator.store.get_small(folder, name)
        if data is None:
            raise Refused(404, "no such part")
        return BytesResponse(data)

    # The CDN

    async def upload_big(self, request: web.Request) -> web.StreamResponse:
        self._require_token(request)
        if self._emulator.config.cdn_requires_length and request.content_length is None:
            raise Refused(411, "a big part must come with its Content-Length")
        folder, name = _cdn_target(request.match_info["path"])
        path = request.path

        async def counted() -> AsyncIterator[bytes]:
            async for chunk in request.content.iter_any():
                self._emulator.record_upload(path, len(chunk))
                yield chunk

        replaced = await self._emulator.store.put_big(folder, name, counted())
        if replaced:
            return web.Response(status=204)
        return BytesResponse.json({"status": "ok"}, status=201)

    async def download_big(self, request: web.Request) -> web.StreamResponse:
        folder, name = _cdn_target(request.match_info["path"])
        path = request.path

        def on_sent(sent: int, complete: bool) -> None:
            self._emulator.record_download(path, sent, complete=complete)

        return FilePartResponse(self._emulator.store.big_path(folder, name), on_sent)

    # Control, for tests and developers

    async def health(self, request: web.Request) -> web.StreamResponse:
        return BytesResponse.json({"status": "ok"})

    async def show_faults(self, request: web.Request) -> web.StreamResponse:
        return BytesResponse.json(self._emulator.faults.to_json())

    async def add_faults(self, request: web.Request) -> web.StreamResponse:
        body = await _json_object(request)
        unknown = set(body) - _RATE_FIELDS - {"rules", "seed"}
        if unknown:
            raise Refused(422, f"unknown fields: {', '.join(sorted(unknown))}")
        raw_rules = body.get("rules", [])
        seed = body.get("seed")
        if not isinstance(raw_rules, list):
            raise Refused(422, "'rules' must be a list")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise Refused(422, "'seed' must be an integer")
        rate_changes: dict[str, Any] = {
            key: value for key, value in body.items() if key in _RATE_FIELDS
        }
        try:
            rules = [FaultRule.from_json(raw) for raw in raw_rules]
            rates = dataclasses.replace(self._emulator.faults.rates, **rate_changes)
        except ValueError as exc:
            raise Refused(422, str(exc)) from None
        self._emulator.add_rules(rules)
        self._emulator.set_rates(rates)
        if "seed" in body:
            self._emulator.faults.reseed(seed)
        return BytesResponse.json(self._emulator.faults.to_json())

    async def clear_faults(self, request: web.Request) -> web.StreamResponse:
        self._emulator.clear_faults()
        return BytesResponse.json(self._emulator.faults.to_json())

    async def revoke_tokens(self, request: web.Request) -> web.StreamResponse:
        return BytesResponse.json({"revoked": self._emulator.revoke_tokens()})

    async def stats(self, request: web.Request) -> web.StreamResponse:
        return BytesResponse.json(self._emulator.stats())

    async def reset_stats(self, request: web.Request) -> web.StreamResponse:
        self._emulator.reset_stats()
        return BytesResponse.json(self._emulator.stats())


async def _echo(request: web.BaseRequest) -> web.StreamResponse:
    """FastAPI's 422 for a body that fails validation, which quotes the body back.

    A client that shows such an answer shows what it sent: a login's password.
    """
    try:
        raw = await request.read()
    except (ConnectionError, HttpProcessingError):
        return HangUp()
    submitted: object
    try:
        submitted = json.loads(raw)
    except ValueError:  # UnicodeDecodeError included
        submitted = raw.decode("utf-8", "replace")
    error = {
        "type": "value_error",
        "loc": ["body"],
        "msg": "Value error, rejected by the emulator",
        "input": submitted,
    }
    return BytesResponse.json({"detail": [error]}, status=422)


async def _discard_body(request: web.BaseRequest) -> None:
    """Read what is left of the request body before answering.

    An answer sent while the client still writes may reach it as a reset
    instead, and aiohttp 3.8 parses the leftover bytes as the next request.
    """
    with contextlib.suppress(ConnectionError, HttpProcessingError):
        while await request.content.readany():
            pass


async def _read_small_upload(request: web.Request) -> tuple[str, bytes]:
    """The NAME and bytes of the one file field ``data``, whose filename is NAME.small."""
    reader = await request.multipart()
    found: tuple[str, bytes] | None = None
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader) or part.name != "data":
            await part.release()
            continue
        if found is not None:
            raise Refused(422, "more than one field 'data'")
        if part.filename is None:
            raise Refused(422, "field 'data' must be a file")
        found = (_file_name(part.filename, SMALL_SUFFIX), await _read_small(part))
    if found is None:
        raise Refused(422, "no file field 'data'")
    return found


async def _read_small(part: BodyPartReader) -> bytes:
    data = bytearray()
    while chunk := await part.read_chunk():
        data += chunk
        if len(data) > MAX_SMALL_PART:
            raise Refused(413, f"a small part is at most {MAX_SMALL_PART} bytes")
    return bytes(data)


def make_app(emulator: Emulator) -> web.Application:
    """The aiohttp application serving ``emulator``: the API at /, the CDN at /cdn."""
    routes = _Routes(emulator)
    app = web.Application(middlewares=[routes.inject_faults])
    app.add_routes(routes.table())
    offset = emulator.config.clock_offset
    if offset:

        async def skewed_date(request: web.Request, response: web.StreamResponse) -> None:
            # Before aiohttp's own Date, which it sets only where none is.
            response.headers[hdrs.DATE] = email.utils.formatdate(time.time() + offset, usegmt=True)

        app.on_response_prepare.append(skewed_date)
    return app
