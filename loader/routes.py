"""The local API's route table (contracts/socket-api.md): thin handlers over the workflows."""

from __future__ import annotations

import json
import logging
from typing import Any, TypeVar

from aiohttp import web

from loader.doctor import daemon_checks
from loader.errors import NameMismatch, ValidationFailed
from loader.images import Docker
from loader.log import Redactor
from loader.metrics import Metrics
from loader.openapi import openapi_document
from loader.remote import ResourceAPI
from loader.resources import Resources, check_name, check_resource_name
from loader.settings import Settings
from loader.systemd import Notifier
from loader.transfer import send_plaintext, upload_form
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
    return await send_plaintext(request, plaintext, f"{folder}/{name}")


@routes.post(f"/upload/{_ANY_NAME}")
async def upload(request: web.Request) -> web.Response:
    name = check_resource_name(request.match_info["filename"])
    resources = request.app[RESOURCES]
    resources.require_login()
    limit = request.app[SETTINGS].max_upload_bytes
    async with upload_form(request, resources, name, limit) as (folder, upload):
        await resources.publish(folder, name, upload)
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
