"""The local API's route table (contracts/socket-api.md): thin handlers over the workflows."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from loader.doctor import daemon_checks
from loader.errors import LoaderError, NameMismatch, PayloadTooLarge, ValidationFailed
from loader.images import Docker
from loader.log import Redactor
from loader.metrics import Metrics
from loader.openapi import openapi_document
from loader.remote import ResourceAPI
from loader.resources import Resources, SpooledBlob, check_name, check_resource_name
from loader.settings import Settings
from loader.systemd import Notifier
from loader.unlock import Unlocker

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

T = TypeVar("T")


# The app's long-lived parts, as the handlers read them; app.py puts them in place.
def _key(name: str, kind: type[T]) -> web.AppKey[T]:
    # aiohttp >= 3.9 wants typed keys; Debian 12's 3.8.4 has none and takes the string.
    factory = getattr(web, "AppKey", None)
    return factory(name, kind) if factory else name  # type: ignore[return-value]


SETTINGS = _key("settings", Settings)
REDACT = _key("redact", Redactor)
NOTIFIER = _key("notifier", Notifier)
METRICS = _key("metrics", Metrics)
API = _key("api", ResourceAPI)
DOCKER = _key("docker", Docker)
UNLOCKER = _key("unlocker", Unlocker)
RESOURCES = _key("resources", Resources)

_UPLOAD_READ = 1024 * 1024
# Multipart boundaries and headers, beyond the file itself.
_FORM_OVERHEAD = 64 * 1024
_MAX_FIELD = 4096
_LOAD_BUFFER = 1024 * 1024


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "healthy"})


@routes.get("/status")
async def status(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "status": "healthy",
            "authenticated": request.app[API].authenticated,
            "modelCacheDir": str(request.app[SETTINGS].model_cache_dir),
        }
    )


@routes.get("/doctor")
async def doctor(request: web.Request) -> web.Response:
    app = request.app
    checks = await daemon_checks(app[SETTINGS], app[API], app[DOCKER], app[REDACT])
    return web.json_response({"checks": [check.as_json() for check in checks]})


@routes.post("/login")
async def login(request: web.Request) -> web.Response:
    body = await json_body(request, {"email": str, "password": str})
    await request.app[API].login(body["email"], body["password"])
    return web.json_response({"status": "ok"})


# Any rest of the path (newlines too), so that a name with a slash, or any traversal form,
# gets its 400 rather than a 404.
_ANY_NAME = r"{filename:[\s\S]*}"


@routes.post(f"/load/{_ANY_NAME}")
async def load(request: web.Request) -> web.StreamResponse:
    name = check_resource_name(request.match_info["filename"])
    body = await json_body(request, {"filename": str, "folder": str})
    if body["filename"] != name:
        raise NameMismatch(f"the name in the path ({name!r}) and in the body differ")
    folder = check_name("folder", body["folder"])
    plaintext = await request.app[RESOURCES].open(folder, name)
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = plaintext.size
    try:
        await response.prepare(request)
        if request.transport is not None:
            # Room for a whole piece: the next is decrypted while the socket drains. A bigger
            # kernel buffer takes a piece in fewer send() calls (capped by net.core.wmem_max).
            request.transport.set_write_buffer_limits(high=_LOAD_BUFFER)
            sock = request.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _LOAD_BUFFER)
        # The last piece goes with write_eof(), which then waits, with no high-water mark,
        # until every byte has left: a stop right after this handler returns loses nothing.
        # (aiohttp >= 3.9 does not wait when write_eof() is given nothing.)
        last = b""
        async for chunk in plaintext.chunks:
            if chunk:
                if last:
                    await response.write(last)
                last = chunk
        if request.transport is not None:
            request.transport.set_write_buffer_limits(high=0)
        await response.write_eof(last)
    except Exception as exc:
        # The status is sent: all that is left is to cut the body short, which the caller
        # sees against the Content-Length.
        if isinstance(exc, LoaderError):
            log.error("load of %s/%s failed mid-stream: %s", folder, name, exc.message)
        elif not isinstance(exc, ConnectionError):
            log.exception("load of %s/%s failed mid-stream", folder, name)
        if request.transport is not None:
            request.transport.abort()
    finally:
        await plaintext.chunks.aclose()
        plaintext.close()
    return response


@routes.post(f"/upload/{_ANY_NAME}")
async def upload(request: web.Request) -> web.Response:
    name = check_resource_name(request.match_info["filename"])
    resources = request.app[RESOURCES]
    resources.require_login()
    limit = request.app[SETTINGS].max_upload_bytes
    if request.content_length is not None and request.content_length > limit + _FORM_OVERHEAD:
        raise PayloadTooLarge(f"the upload is larger than MAX_UPLOAD_BYTES ({limit} bytes)")
    if not request.content_type.startswith("multipart/"):
        raise ValidationFailed("body: expected multipart/form-data with fields 'data' and 'folder'")
    folder: str | None = None
    blob: SpooledBlob | None = None
    try:
        reader = await request.multipart()
        while (part := await _next_part(reader)) is not None:
            if not isinstance(part, BodyPartReader):
                raise ValidationFailed("body: nested multipart is not accepted")
            if part.name == "folder":
                folder = check_name("folder", await _form_text(part))
            elif part.name in ("data", "file") and blob is None:
                blob = await resources.encrypt_upload(_part_chunks(part))
            else:
                await part.release()
        if blob is None:
            raise ValidationFailed("body.data: field required (the file, as 'data' or 'file')")
        if folder is None:
            raise ValidationFailed("body.folder: field required")
        await resources.publish(folder, name, blob)
    finally:
        if blob is not None:
            await asyncio.to_thread(blob.big.abort)
    return web.json_response({"status": "ok"})


@routes.post("/unlock")
async def unlock(request: web.Request) -> web.Response:
    body = await json_body(request, {"email": str, "password": str})
    state = await request.app[UNLOCKER].start(body["email"], body["password"])
    return web.json_response({"state": state.value})


@routes.get("/unlock/status")
async def unlock_status(request: web.Request) -> web.Response:
    return web.json_response(request.app[UNLOCKER].status())


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    body, content_type = await request.app[METRICS].scrape()
    # Set as a header: web.Response's content_type refuses one with a charset in it.
    return web.Response(body=body, headers={"Content-Type": content_type})


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


async def _next_part(reader: MultipartReader) -> Any:
    try:
        return await reader.next()
    except (HttpProcessingError, ValueError, AssertionError):
        raise ValidationFailed("body: malformed multipart/form-data") from None


async def _part_chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while True:
        try:
            chunk = await part.read_chunk(_UPLOAD_READ)
        except (HttpProcessingError, ValueError, AssertionError):
            raise ValidationFailed("body: malformed multipart/form-data") from None
        if not chunk:
            return
        yield chunk


async def _form_text(part: BodyPartReader) -> str:
    # One read_chunk may end short of the part's end: aiohttp 3.8 (Debian 12's) returns what
    # the stream holds when the field's boundary has not arrived yet. Read on to the boundary.
    raw = b""
    while not part.at_eof():
        raw += await part.read_chunk(_MAX_FIELD)
        if len(raw) >= _MAX_FIELD:
            raise ValidationFailed(f"body.{part.name}: too long")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise ValidationFailed(f"body.{part.name}: not UTF-8 text") from None


async def json_body(request: web.Request, fields: dict[str, type]) -> dict[str, Any]:
    """The body as a JSON object with `fields` of the right types, as FastAPI's model checks it.

    Any content type is read as JSON: `curl -d` sends form-urlencoded by default.
    """
    raw = await request.read()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ValidationFailed("body: not valid JSON") from None
    if not isinstance(data, dict):
        raise ValidationFailed("body: expected a JSON object")
    for name, kind in fields.items():
        if name not in data:
            raise ValidationFailed(f"body.{name}: field required")
        if not isinstance(data[name], kind):
            raise ValidationFailed(f"body.{name}: expected a {kind.__name__}")
    return {name: data[name] for name in fields}
