"""Fault matrix, CDN: 404, a body cut short (resumed with Range), a Range answered with 200,
a Content-Length that lies."""

from __future__ import annotations

import os

import pytest

from tests.conftest import RunningEmulator
from tests.emulator import FaultRule
from tests.faults.conftest import FOLDER, Client, Scene, StartApp, assert_clear_error


async def uploaded_uncached(scene: Scene, name: str, size: int) -> tuple[Client, bytes]:
    """A logged-in client, and a resource on the API and CDN that the cache does not hold."""
    client = scene.client()
    assert (await client.login())[0] == 200
    data = os.urandom(size)
    assert (await client.upload(name, data))[0] == 200
    (scene.cache / FOLDER / f"{name}.big").unlink()
    return client, data


def cdn_path(name: str) -> str:
    return f"/cdn/{FOLDER}/{name}.big"


async def test_404(start_app: StartApp, emulator: RunningEmulator) -> None:
    scene = await start_app()
    client, data = await uploaded_uncached(scene, "half.bin", 50_000)
    emulator.emulator.store.big_path(FOLDER, "half.bin").unlink()
    loaded = await client.load("half.bin")
    assert_clear_error(
        loaded.status, loaded.body, 404, "remote-not-found", "the CDN has no big part"
    )
    await scene.assert_after(data)


@pytest.mark.parametrize("count", [1, None], ids=["burst", "lasting"])
async def test_5xx(start_app: StartApp, emulator: RunningEmulator, count: int | None) -> None:
    """A GET is idempotent: a 5xx from the CDN is retried like the API's (API_RETRIES)."""
    scene = await start_app()
    client, data = await uploaded_uncached(scene, "flaky.bin", 300_000)
    emulator.emulator.add_rule(
        FaultRule(
            method="GET", path_prefix=cdn_path("flaky.bin"), kind="status", status=503, count=count
        )
    )
    loaded = await client.load("flaky.bin")
    if count == 1:
        assert (loaded.status, loaded.body) == (200, data)
    else:
        assert_clear_error(loaded.status, loaded.body, 502, "remote-refused", "HTTP 503")
        assert emulator.emulator.requests("GET", cdn_path("flaky.bin")) == 3  # 1 + API_RETRIES
    await scene.assert_after(data)


@pytest.mark.parametrize("count", [1, None], ids=["resumed", "lasting"])
async def test_cut_body(start_app: StartApp, emulator: RunningEmulator, count: int | None) -> None:
    scene = await start_app()
    client, data = await uploaded_uncached(scene, "cut.bin", 2_000_000)
    emulator.emulator.add_rule(
        FaultRule(
            method="GET",
            path_prefix=cdn_path("cut.bin"),
            kind="truncate",
            count=count,
            # Lasting: every answer cut after 100 kB, so three attempts cannot make 2 MB.
            truncate_at=700_000 if count == 1 else 100_000,
        )
    )
    loaded = await client.load("cut.bin")
    if count == 1:
        assert (loaded.status, loaded.body) == (200, data)
        # The second request asked for the rest only.
        assert emulator.emulator.requests("GET", cdn_path("cut.bin")) == 2
        assert emulator.emulator.stats()["bytes_served"][cdn_path("cut.bin")] < len(data) + 1000
    else:
        assert_clear_error(loaded.status, loaded.body, 503, "remote-unavailable", "was cut at")
        assert emulator.emulator.requests("GET", cdn_path("cut.bin")) == 3  # 1 + API_RETRIES
        emulator.emulator.clear_faults()
        loaded = await client.load("cut.bin")
        assert (loaded.status, loaded.body) == (200, data)
    await scene.assert_after(data)


async def test_range_answered_with_200(start_app: StartApp, emulator: RunningEmulator) -> None:
    """A cut download whose resume gets the whole body again (200, not 206).

    `stream_big_part` refuses to resume then: the bytes already in the cache file would be
    followed by the object's start. The caller gets a clear 502 and the partial file goes;
    the next /load downloads the whole big part again.
    """
    scene = await start_app()
    client, data = await uploaded_uncached(scene, "norange.bin", 2_000_000)
    emulator.emulator.add_rules(
        [
            FaultRule(
                method="GET",
                path_prefix=cdn_path("norange.bin"),
                kind="truncate",
                count=1,
                truncate_at=700_000,
            ),
            FaultRule(
                method="GET", path_prefix=cdn_path("norange.bin"), kind="ignore-range", count=1
            ),
        ]
    )
    loaded = await client.load("norange.bin")
    assert_clear_error(loaded.status, loaded.body, 502, "remote-refused", "ignored a Range request")
    assert emulator.emulator.requests("GET", cdn_path("norange.bin")) == 2
    await scene.assert_after(data)
    loaded = await client.load("norange.bin")
    assert (loaded.status, loaded.body) == (200, data)
    await scene.assert_after(data)


async def test_wrong_length(start_app: StartApp, emulator: RunningEmulator) -> None:
    """The CDN announces one byte more than it sends, then closes.

    The loader takes it as a cut, and asks for the rest from where it stopped: the CDN
    answers 416 (nothing is there), a clear 502, nothing cached; without the fault it works.
    """
    scene = await start_app()
    client, data = await uploaded_uncached(scene, "liar.bin", 300_000)
    emulator.emulator.add_rule(
        FaultRule(method="GET", path_prefix=cdn_path("liar.bin"), kind="wrong-length", count=1)
    )
    loaded = await client.load("liar.bin")
    assert_clear_error(loaded.status, loaded.body, 502, "remote-refused", "HTTP 416")
    await scene.assert_after(data)
    loaded = await client.load("liar.bin")
    assert (loaded.status, loaded.body) == (200, data)
    await scene.assert_after(data)
