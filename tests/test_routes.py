"""The local API's endpoints over a real Unix socket, against the emulator over real HTTP."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from loader.routes import SETTINGS
from loader.settings import Settings
from tests.conftest import EMAIL, PASSWORD, LocalApp, RunningEmulator
from tests.emulator import FaultRule


async def test_health(local: LocalApp) -> None:
    async with local.session.get(local.url("/health")) as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "healthy"}


async def test_status_before_and_after_login(local: LocalApp) -> None:
    async with local.session.get(local.url("/status")) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body == {
        "status": "healthy",
        "authenticated": False,
        "modelCacheDir": str(local.app[SETTINGS].model_cache_dir),
    }

    async with local.session.post(
        local.url("/login"), json={"email": EMAIL, "password": PASSWORD}
    ) as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}

    async with local.session.get(local.url("/status")) as resp:
        assert (await resp.json())["authenticated"] is True


async def test_login_wrong_password_is_401_with_detail(local: LocalApp) -> None:
    async with local.session.post(
        local.url("/login"), json={"email": EMAIL, "password": "wrong-password"}
    ) as resp:
        assert resp.status == 401
        body = await resp.json()
    assert body["code"] == "wrong-credentials"
    assert "wrong email or password" in body["detail"]
    assert "wrong-password" not in body["detail"]


async def test_login_unknown_user_is_401(local: LocalApp) -> None:
    async with local.session.post(
        local.url("/login"), json={"email": "nobody@x.test", "password": PASSWORD}
    ) as resp:
        assert resp.status == 401


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b"", "body: not valid JSON"),
        (b"{not json", "body: not valid JSON"),
        (b"\xff\xfe", "body: not valid JSON"),
        (b"[]", "body: expected a JSON object"),
        (b'"text"', "body: expected a JSON object"),
        (b"{}", "body.email: field required"),
        (b'{"email": "a@b.c"}', "body.password: field required"),
        (b'{"email": 5, "password": "x"}', "body.email: expected a str"),
        (b'{"email": "a@b.c", "password": null}', "body.password: expected a str"),
    ],
)
async def test_login_broken_body_is_422(local: LocalApp, body: bytes, detail: str) -> None:
    async with local.session.post(
        local.url("/login"), data=body, headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 422
        assert await resp.json() == {"detail": detail, "code": "validation-error"}


async def test_login_accepts_a_body_sent_as_form_content_type(local: LocalApp) -> None:
    # `curl -d '{...}'` labels JSON as form-urlencoded; the first loader read it anyway.
    body = b'{"email": "%s", "password": "%s"}' % (EMAIL.encode(), PASSWORD.encode())
    async with local.session.post(
        local.url("/login"),
        data=body,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    ) as resp:
        assert resp.status == 200


async def test_oversized_body_is_413(local: LocalApp) -> None:
    big = b'{"email": "' + b"a" * (200 * 1024) + b'", "password": "x"}'
    async with local.session.post(local.url("/login"), data=big) as resp:
        assert resp.status == 413
        body = await resp.json()
    assert body["code"] == "payload-too-large"


async def test_unknown_path_is_404_json(local: LocalApp) -> None:
    async with local.session.get(local.url("/no/such/path")) as resp:
        assert resp.status == 404
        assert await resp.json() == {"detail": "Not Found", "code": "not-found"}


async def test_wrong_method_is_405_json_with_allow(local: LocalApp) -> None:
    async with local.session.delete(local.url("/health")) as resp:
        assert resp.status == 405
        assert "GET" in resp.headers["Allow"]
        assert await resp.json() == {"detail": "Method Not Allowed", "code": "method-not-allowed"}


async def test_login_when_api_is_down_is_503(
    make_local_app: Callable[[Settings], Any],
    with_settings: Callable[..., Settings],
    unused_tcp_port: int,
) -> None:
    down: LocalApp = await make_local_app(
        with_settings(resource_api_url=f"http://127.0.0.1:{unused_tcp_port}", api_retries=1)
    )
    async with down.session.post(
        down.url("/login"), json={"email": EMAIL, "password": PASSWORD}
    ) as resp:
        assert resp.status == 503
        body = await resp.json()
    assert body["code"] == "remote-unavailable"
    assert "could not reach the Resource API" in body["detail"]


async def test_login_when_api_fails_is_502(local: LocalApp, emulator: RunningEmulator) -> None:
    emulator.emulator.add_rule(
        FaultRule(method="POST", path_prefix="/login", kind="status", status=500, count=None)
    )
    async with local.session.post(
        local.url("/login"), json={"email": EMAIL, "password": PASSWORD}
    ) as resp:
        assert resp.status == 502
        body = await resp.json()
    assert body["code"] == "remote-refused"
    assert "HTTP 500" in body["detail"]
