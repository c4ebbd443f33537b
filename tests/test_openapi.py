"""/openapi.json against what the daemon really does: the routes it serves, the answers it gives."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import EMAIL, PASSWORD, LocalApp, upload_form

# The local API's contract (contracts/socket-api.md): the document must at least cover it.
CONTRACT = {
    ("GET", "/health"),
    ("GET", "/status"),
    ("POST", "/login"),
    ("POST", "/load/{filename}"),
    ("POST", "/upload/{filename}"),
    ("POST", "/unlock"),
    ("GET", "/unlock/status"),
}

WRONG = {"email": EMAIL, "password": "not-the-password"}
RIGHT = {"email": EMAIL, "password": PASSWORD}
LOAD = {"filename": "model.bin", "folder": "models"}

# Requests the daemon answers without Docker, an archive or a login: (method, path the
# document names, path sent, a JSON body or a form and its Content-Type, the status the
# daemon gives).
ANSWERS = [
    ("GET", "/health", "/health", None, 200),
    ("GET", "/status", "/status", None, 200),
    ("GET", "/unlock/status", "/unlock/status", None, 200),
    ("GET", "/metrics", "/metrics", None, 200),
    ("GET", "/openapi.json", "/openapi.json", None, 200),
    ("POST", "/login", "/login", RIGHT, 200),
    ("POST", "/login", "/login", WRONG, 401),
    ("POST", "/login", "/login", {"email": EMAIL}, 422),
    ("POST", "/load/{filename}", "/load/model.bin", LOAD, 401),
    ("POST", "/load/{filename}", "/load/other.bin", LOAD, 400),
    ("POST", "/load/{filename}", "/load/model.bin", {"folder": 3}, 422),
    ("POST", "/unlock", "/unlock", {"password": PASSWORD}, 422),
    ("POST", "/upload/{filename}", "/upload/model.bin", upload_form(), 401),
    ("POST", "/upload/{filename}", "/upload/model.bin.integrity", upload_form(), 400),
]


async def served_document(local: LocalApp) -> dict[str, Any]:
    async with local.session.get(local.url("/openapi.json")) as resp:
        assert resp.status == 200
        document: dict[str, Any] = await resp.json()
    return document


@pytest.fixture
async def local_document(local: LocalApp) -> dict[str, Any]:
    return await served_document(local)


def operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, path_operations in document["paths"].items()
        for method in path_operations
    }


def resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        _, _, name = schema["$ref"].rpartition("/")
        schema = document["components"]["schemas"][name]
    return schema


TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "boolean": (bool,),
    "integer": (int,),
    "number": (int, float),
}


def violations(
    document: dict[str, Any], schema: dict[str, Any], value: Any, at: str = "$"
) -> list[str]:
    """Where `value` breaks `schema`: the parts of OpenAPI 3.0's schemas the document uses."""
    schema = resolve(document, schema)
    if value is None:
        return [] if schema.get("nullable") else [f"{at} is null"]
    wanted = TYPES[schema["type"]]
    if not isinstance(value, wanted) or (isinstance(value, bool) and bool not in wanted):
        return [f"{at} is not {schema['type']}: {value!r}"]
    found = []
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{at} = {value!r} is not one of {schema['enum']}")
    if "minimum" in schema and value < schema["minimum"]:
        found.append(f"{at} = {value!r} < {schema['minimum']}")
    if "maximum" in schema and value > schema["maximum"]:
        found.append(f"{at} = {value!r} > {schema['maximum']}")
    if isinstance(value, dict):
        found += [
            f"{at}.{name} is missing" for name in schema.get("required", []) if name not in value
        ]
        for name, inner in schema.get("properties", {}).items():
            if name in value:
                found += violations(document, inner, value[name], f"{at}.{name}")
    if isinstance(value, list):
        for index, item in enumerate(value):
            found += violations(document, schema["items"], item, f"{at}[{index}]")
    return found


def test_the_checker_finds_what_breaks_a_schema(local_document: dict[str, Any]) -> None:
    error = {"$ref": "#/components/schemas/Error"}
    status = {"$ref": "#/components/schemas/UnlockStatus"}
    assert violations(local_document, error, {"detail": "x", "code": "y"}) == []
    assert violations(local_document, error, {"code": "y"}) == ["$.detail is missing"]
    assert violations(local_document, status, {"state": "nope", "error": None}) != []
    assert violations(local_document, status, {"state": "idle", "error": 3}) != []
    assert (
        violations(local_document, status, {"state": "idle", "error": None, "percent": 101}) != []
    )


def test_the_document_covers_the_contract(local_document: dict[str, Any]) -> None:
    assert operations(local_document) >= CONTRACT


def test_the_document_names_exactly_the_routes_served(
    local: LocalApp, local_document: dict[str, Any]
) -> None:
    routed = {
        (route.method, route.resource.canonical)
        for route in local.app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    assert operations(local_document) == routed


@pytest.mark.parametrize(("method", "template", "path", "body", "status"), ANSWERS)
async def test_a_real_answer_is_documented(
    local: LocalApp,
    local_document: dict[str, Any],
    method: str,
    template: str,
    path: str,
    body: dict[str, Any] | tuple[bytes, str] | None,
    status: int,
) -> None:
    if isinstance(body, tuple):
        sent: dict[str, Any] = {"data": body[0], "headers": {"Content-Type": body[1]}}
    else:
        sent = {"json": body}
    async with local.session.request(method, local.url(path), **sent) as resp:
        assert resp.status == status
        content_type = resp.content_type
        payload: Any = (
            await resp.json() if content_type == "application/json" else await resp.text()
        )
    responses = local_document["paths"][template][method.lower()]["responses"]
    assert str(status) in responses, f"{method} {template} answers {status}, not documented"
    content = responses[str(status)]["content"]
    assert content_type in content, (content_type, list(content))
    assert violations(local_document, content[content_type]["schema"], payload) == []
    if status >= 400:
        assert isinstance(payload["code"], str), payload
        assert payload["code"], payload
