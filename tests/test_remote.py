"""The Resource API client against the emulator over real HTTP, faults included."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import replace

import aiohttp
import pytest

from loader.errors import NotAuthenticated, RemoteRefused, RemoteUnavailable, WrongCredentials
from loader.log import Redactor
from loader.remote import ResourceAPI
from loader.settings import Settings
from tests.conftest import ARCHIVE_FRAGMENT, EMAIL, PASSWORD, RESOURCE_FRAGMENT, RunningEmulator
from tests.emulator import FaultRule


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def api(session: aiohttp.ClientSession, settings: Settings) -> ResourceAPI:
    return ResourceAPI(session, settings, Redactor())


def requests_to(emulator: RunningEmulator, key: str) -> int:
    return int(emulator.emulator.stats()["requests"].get(key, 0))


async def test_login_and_both_fragments(api: ResourceAPI) -> None:
    assert not api.authenticated
    await api.login(EMAIL, PASSWORD)
    assert api.authenticated
    assert await api.fetch_archive_fragment() == ARCHIVE_FRAGMENT
    assert await api.fetch_resource_fragment() == RESOURCE_FRAGMENT


async def test_wrong_password(api: ResourceAPI) -> None:
    with pytest.raises(WrongCredentials, match="wrong email or password"):
        await api.login(EMAIL, "not-the-password")
    assert not api.authenticated


async def test_a_failed_login_keeps_the_credentials_that_work(api: ResourceAPI) -> None:
    await api.login(EMAIL, PASSWORD)
    with pytest.raises(WrongCredentials):
        await api.login(EMAIL, "typo")
    assert api.authenticated
    assert await api.fetch_archive_fragment() == ARCHIVE_FRAGMENT


async def test_calls_before_login_are_refused(api: ResourceAPI) -> None:
    with pytest.raises(NotAuthenticated, match="not logged in"):
        await api.fetch_archive_fragment()


async def test_api_down(
    session: aiohttp.ClientSession, settings: Settings, unused_tcp_port: int
) -> None:
    down = replace(settings, resource_api_url=f"http://127.0.0.1:{unused_tcp_port}", api_retries=2)
    api = ResourceAPI(session, down, Redactor())
    with pytest.raises(RemoteUnavailable, match="could not reach the Resource API for login"):
        await api.login(EMAIL, PASSWORD)


async def test_dns_failure(session: aiohttp.ClientSession, settings: Settings) -> None:
    unknown = replace(settings, resource_api_url="http://no-such-host.invalid", api_retries=0)
    api = ResourceAPI(session, unknown, Redactor())
    with pytest.raises(RemoteUnavailable, match="could not reach the Resource API"):
        await api.login(EMAIL, PASSWORD)


async def test_5xx_then_success(api: ResourceAPI, emulator: RunningEmulator) -> None:
    emulator.emulator.add_rule(
        FaultRule(method="POST", path_prefix="/login", kind="status", status=503, count=2)
    )
    await api.login(EMAIL, PASSWORD)
    assert api.authenticated
    assert requests_to(emulator, "POST /login") == 3


async def test_5xx_that_lasts_ends_in_a_clear_error(
    api: ResourceAPI, emulator: RunningEmulator
) -> None:
    emulator.emulator.add_rule(
        FaultRule(method="POST", path_prefix="/login", kind="status", status=503, count=None)
    )
    with pytest.raises(RemoteRefused, match="failed for login: HTTP 503"):
        await api.login(EMAIL, PASSWORD)
    assert requests_to(emulator, "POST /login") == 3  # the first try and api_retries=2


async def test_dropped_connection_then_success(api: ResourceAPI, emulator: RunningEmulator) -> None:
    await api.login(EMAIL, PASSWORD)
    # Two drops: aiohttp itself retries a GET once after a disconnect.
    emulator.emulator.add_rule(
        FaultRule(method="GET", path_prefix="/binary-split/key-fragment", kind="drop", count=2)
    )
    assert await api.fetch_archive_fragment() == ARCHIVE_FRAGMENT
    assert requests_to(emulator, "GET /binary-split/key-fragment") == 3


async def test_body_cut_short_then_success(api: ResourceAPI, emulator: RunningEmulator) -> None:
    await api.login(EMAIL, PASSWORD)
    emulator.emulator.add_rule(
        FaultRule(
            method="GET",
            path_prefix="/resources/key-fragment",
            kind="truncate",
            count=1,
            truncate_at=3,
        )
    )
    assert await api.fetch_resource_fragment() == RESOURCE_FRAGMENT


async def test_timeout_is_a_clear_error(
    session: aiohttp.ClientSession, settings: Settings, emulator: RunningEmulator
) -> None:
    api = ResourceAPI(session, replace(settings, api_timeout=0.3, api_retries=1), Redactor())
    emulator.emulator.add_rule(
        FaultRule(method="POST", path_prefix="/login", kind="delay", delay=2.0, count=None)
    )
    with pytest.raises(RemoteUnavailable, match="login: timed out"):
        await api.login(EMAIL, PASSWORD)


async def test_token_expired_midway_logs_in_again_once(
    api: ResourceAPI, emulator: RunningEmulator
) -> None:
    await api.login(EMAIL, PASSWORD)
    assert await api.fetch_archive_fragment() == ARCHIVE_FRAGMENT
    emulator.emulator.revoke_tokens()
    assert await api.fetch_resource_fragment() == RESOURCE_FRAGMENT
    assert requests_to(emulator, "POST /login") == 2
    assert requests_to(emulator, "GET /resources/key-fragment") == 2


async def test_a_second_401_is_an_authentication_failure(
    api: ResourceAPI, emulator: RunningEmulator
) -> None:
    await api.login(EMAIL, PASSWORD)
    emulator.emulator.add_rule(
        FaultRule(
            method="GET",
            path_prefix="/binary-split/key-fragment",
            kind="status",
            status=401,
            count=None,
        )
    )
    with pytest.raises(NotAuthenticated, match="after a fresh login"):
        await api.fetch_archive_fragment()
    assert requests_to(emulator, "GET /binary-split/key-fragment") == 2
    assert requests_to(emulator, "POST /login") == 2


async def test_credentials_revoked_on_the_server(
    api: ResourceAPI, emulator: RunningEmulator
) -> None:
    await api.login(EMAIL, PASSWORD)
    emulator.emulator.revoke_tokens()
    emulator.emulator.add_rule(
        FaultRule(method="POST", path_prefix="/login", kind="status", status=401, count=None)
    )
    with pytest.raises(NotAuthenticated, match="no longer accepts"):
        await api.fetch_archive_fragment()
    assert not api.authenticated


async def test_secrets_never_reach_the_log(
    api: ResourceAPI, emulator: RunningEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    emulator.emulator.add_rule(
        FaultRule(method="POST", path_prefix="/login", kind="status", status=503, count=1)
    )
    await api.login(EMAIL, PASSWORD)
    emulator.emulator.revoke_tokens()
    await api.fetch_archive_fragment()
    text = caplog.text
    assert "logged in" in text
    assert PASSWORD not in text
    assert ARCHIVE_FRAGMENT.decode("utf-8", "replace") not in text
    assert ARCHIVE_FRAGMENT.hex() not in text
