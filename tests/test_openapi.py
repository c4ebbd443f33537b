"""/openapi.json documents the whole local API, and the router serves nothing it leaves out."""

from __future__ import annotations

from loader.app import make_app
from loader.log import Redactor
from loader.openapi import openapi_document
from loader.settings import Settings
from loader.systemd import Notifier
from tests.conftest import LocalApp

CONTRACT = {
    ("GET", "/health"),
    ("GET", "/status"),
    ("POST", "/login"),
    ("POST", "/load/{filename}"),
    ("POST", "/upload/{filename}"),
    ("POST", "/unlock"),
    ("GET", "/unlock/status"),
}


def documented() -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, operations in openapi_document()["paths"].items()
        for method in operations
    }


def routed() -> set[tuple[str, str]]:
    app = make_app(Settings(), Redactor(), Notifier({}))
    return {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }


def test_the_document_covers_the_contract() -> None:
    assert documented() >= CONTRACT


def test_every_route_is_documented() -> None:
    assert routed() <= documented()


def test_every_documented_error_uses_the_error_schema() -> None:
    for path, operations in openapi_document()["paths"].items():
        for method, operation in operations.items():
            for status, answer in operation["responses"].items():
                if int(status) >= 400:
                    schema = answer["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (method, path)


async def test_served_over_the_socket(local: LocalApp) -> None:
    async with local.session.get(local.url("/openapi.json")) as resp:
        assert resp.status == 200
        assert await resp.json() == openapi_document()
