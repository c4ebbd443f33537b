"""Fault matrix, Resource API: refused, unknown host, timeout, 5xx, a body cut short, a 401
in the middle of unlock, upload and load."""

from __future__ import annotations

import os
import time

import pytest

from tests.conftest import RunningEmulator
from tests.dockerd import ArchiveInfo, PrivateDockerd
from tests.emulator import FaultRule
from tests.faults.conftest import FOLDER, StartApp, assert_clear_error


async def test_refused_connection(start_app: StartApp, unused_tcp_port: int) -> None:
    scene = await start_app(resource_api_url=f"http://127.0.0.1:{unused_tcp_port}")
    client = scene.client()
    status, body = await client.login()
    assert_clear_error(status, body, 503, "remote-unavailable", "could not reach the Resource API")
    await scene.assert_after()


async def test_dns_failure(start_app: StartApp) -> None:
    scene = await start_app(resource_api_url="http://x.invalid")
    status, body = await scene.client().login()
    assert_clear_error(status, body, 503, "remote-unavailable", "could not reach the Resource API")
    await scene.assert_after()


async def test_timeout(start_app: StartApp, emulator: RunningEmulator) -> None:
    scene = await start_app(api_timeout=0.5, api_retries=1)
    client = scene.client()
    assert (await client.login())[0] == 200
    data = os.urandom(50_000)
    assert (await client.upload("slow.bin", data))[0] == 200
    emulator.emulator.add_rule(
        FaultRule(
            method="GET", path_prefix="/resources/key-fragment", kind="delay", delay=1.5, count=2
        )
    )
    started = time.monotonic()
    loaded = await client.load("slow.bin", limit=2 * 0.5 + 0.5 + 2.0)
    assert_clear_error(loaded.status, loaded.body, 503, "remote-unavailable", "timed out")
    assert time.monotonic() - started < 2 * 0.5 + 0.5 + 1.0
    # Nothing lost: once the API answers in time, the resource is there.
    loaded = await client.load("slow.bin")
    assert (loaded.status, loaded.body) == (200, data)
    await scene.assert_after(data)


@pytest.mark.parametrize(
    ("flow", "count"),
    [("load", 2), ("load", None), ("upload", 1), ("upload", None)],
    ids=["load-burst", "load-lasting", "upload-once", "upload-lasting"],
)
async def test_5xx(
    start_app: StartApp, emulator: RunningEmulator, flow: str, count: int | None
) -> None:
    scene = await start_app()
    client = scene.client()
    assert (await client.login())[0] == 200
    data = os.urandom(20_000)
    if flow == "load":
        assert (await client.upload("flaky.bin", data))[0] == 200
        prefix, method = "/resources/get/", "POST"
    else:
        prefix, method = f"/resources/{FOLDER}", "POST"
    emulator.emulator.add_rule(
        FaultRule(method=method, path_prefix=prefix, kind="status", status=503, count=count)
    )
    if flow == "load":
        loaded = await client.load("flaky.bin")
        if count is None:
            assert_clear_error(loaded.status, loaded.body, 502, "remote-refused", "HTTP 503")
        else:  # /resources/get is idempotent: retried through a burst within API_RETRIES
            assert (loaded.status, loaded.body) == (200, data)
    else:
        # The small part's upload is not idempotent: one 503 is the answer.
        status, body = await client.upload("flaky.bin", data)
        assert_clear_error(status, body, 502, "remote-refused", "HTTP 503")
        assert emulator.emulator.requests(method, prefix) == 1
        assert not emulator.emulator.store.small_path(FOLDER, "flaky.bin").exists()
    emulator.emulator.clear_faults()
    if flow == "upload":
        assert (await client.upload("flaky.bin", data))[0] == 200
    loaded = await client.load("flaky.bin")
    assert (loaded.status, loaded.body) == (200, data)
    await scene.assert_after(data)


@pytest.mark.parametrize("count", [1, None], ids=["once", "lasting"])
async def test_body_cut_short(
    start_app: StartApp, emulator: RunningEmulator, count: int | None
) -> None:
    scene = await start_app()
    client = scene.client()
    assert (await client.login())[0] == 200
    data = os.urandom(30_000)
    assert (await client.upload("cut.bin", data))[0] == 200
    emulator.emulator.add_rule(
        FaultRule(
            method="POST",
            path_prefix="/resources/get/",
            kind="truncate",
            count=count,
            truncate_at=7,
        )
    )
    loaded = await client.load("cut.bin")
    if count is None:
        assert_clear_error(loaded.status, loaded.body, 503, "remote-unavailable", "could not reach")
        emulator.emulator.clear_faults()
        loaded = await client.load("cut.bin")
    assert (loaded.status, loaded.body) == (200, data)
    await scene.assert_after(data)


@pytest.mark.docker
async def test_401_in_the_middle_of_unlock(
    start_app: StartApp,
    emulator: RunningEmulator,
    private_dockerd: PrivateDockerd,
    image_archive: ArchiveInfo,
    no_stack_images: list[str],
) -> None:
    scene = await start_app(private_dockerd, images_path=image_archive.path)
    client = scene.client()
    emulator.emulator.add_rule(
        FaultRule(
            method="GET",
            path_prefix="/binary-split/key-fragment",
            kind="status",
            status=401,
            count=1,
        )
    )
    status, _ = await client.unlock()
    assert status == 200
    final = await client.settled()
    assert final["state"] == "ready", final
    assert emulator.emulator.stats()["logins"] == 2
    assert emulator.emulator.requests("GET", "/binary-split/key-fragment") == 2
    await scene.assert_after(images=True)


@pytest.mark.docker
async def test_401_that_lasts_in_the_middle_of_unlock(
    start_app: StartApp,
    emulator: RunningEmulator,
    private_dockerd: PrivateDockerd,
    image_archive: ArchiveInfo,
    no_stack_images: list[str],
) -> None:
    scene = await start_app(private_dockerd, images_path=image_archive.path)
    client = scene.client()
    emulator.emulator.add_rule(
        FaultRule(
            method="GET",
            path_prefix="/binary-split/key-fragment",
            kind="status",
            status=401,
            count=None,
        )
    )
    assert (await client.unlock())[0] == 200
    final = await client.settled()
    assert final["state"] == "error", final
    assert "after a fresh login" in final["error"]
    await scene.assert_after(images=False)


async def test_401_in_the_middle_of_upload(start_app: StartApp, emulator: RunningEmulator) -> None:
    scene = await start_app()
    client = scene.client()
    assert (await client.login())[0] == 200
    # The small part's upload: not idempotent, but a 401 is answered before any effect.
    emulator.emulator.add_rule(
        FaultRule(
            method="POST", path_prefix=f"/resources/{FOLDER}", kind="status", status=401, count=1
        )
    )
    data = os.urandom(40_000)
    status, body = await client.upload("renew.bin", data)
    assert status == 200, body
    assert emulator.emulator.stats()["logins"] == 2
    loaded = await client.load("renew.bin")
    assert (loaded.status, loaded.body) == (200, data)
    await scene.assert_after(data)


@pytest.mark.parametrize("how", ["rule", "revoked"])
async def test_401_in_the_middle_of_load(
    start_app: StartApp, emulator: RunningEmulator, how: str
) -> None:
    scene = await start_app()
    client = scene.client()
    assert (await client.login())[0] == 200
    data = os.urandom(40_000)
    assert (await client.upload("renew.bin", data))[0] == 200
    if how == "rule":
        emulator.emulator.add_rule(
            FaultRule(
                method="POST", path_prefix="/resources/get/", kind="status", status=401, count=1
            )
        )
    else:
        emulator.emulator.revoke_tokens()
    loaded = await client.load("renew.bin")
    assert (loaded.status, loaded.body) == (200, data)
    assert emulator.emulator.stats()["logins"] == 2
    await scene.assert_after(data)


async def test_login_refused_for_good_in_the_middle_of_load(
    start_app: StartApp, emulator: RunningEmulator
) -> None:
    scene = await start_app()
    client = scene.client()
    assert (await client.login())[0] == 200
    data = os.urandom(40_000)
    assert (await client.upload("gone.bin", data))[0] == 200
    emulator.emulator.revoke_tokens()
    emulator.emulator.add_rule(
        FaultRule(method="POST", path_prefix="/login", kind="status", status=401, count=None)
    )
    loaded = await client.load("gone.bin")
    assert_clear_error(loaded.status, loaded.body, 401, "not-authenticated", "log in again")
    await scene.assert_after(data)
