"""Fault matrix, load: 50 concurrent /unlock (one workflow), 50 concurrent /load (one
download), 1,000 concurrent connections on the socket (served or refused, never a crash)."""

from __future__ import annotations

import asyncio
import collections
import os
from pathlib import Path

import pytest

from tests.conftest import RunningEmulator, wait_for
from tests.dockerd import ArchiveInfo, PrivateDockerd
from tests.faults.conftest import FOLDER, StartApp, StartDaemon
from tests.test_metrics import Scrape


@pytest.mark.docker
async def test_50_concurrent_unlocks_run_one_workflow(
    start_app: StartApp,
    emulator: RunningEmulator,
    private_dockerd: PrivateDockerd,
    image_archive: ArchiveInfo,
    no_stack_images: list[str],
) -> None:
    scene = await start_app(private_dockerd, images_path=image_archive.path)
    client = scene.client()
    answers = await asyncio.gather(*(client.unlock() for _ in range(50)))
    assert {status for status, _ in answers} == {200}, answers
    final = await client.settled()
    assert final["state"] == "ready", final
    assert emulator.emulator.requests("GET", "/binary-split/key-fragment") == 1
    assert emulator.emulator.stats()["logins"] == 1
    await scene.assert_after(images=True)


async def test_50_concurrent_loads_download_once(
    start_app: StartApp, emulator: RunningEmulator
) -> None:
    scene = await start_app()
    client = scene.client(limit=60)
    assert (await client.login())[0] == 200
    data = os.urandom(4_000_000)
    assert (await client.upload("shared.bin", data))[0] == 200
    (scene.cache / FOLDER / "shared.bin.big").unlink()
    emu = emulator.emulator
    emu.reset_stats()
    cdn = f"/cdn/{FOLDER}/shared.bin.big"
    # The download waits at the gate until every load has asked the API for its parts
    # (small part and integrity record): the loads overlap for certain, not by timing.
    gate = emu.hold("GET", cdn)
    loads = [asyncio.ensure_future(client.load("shared.bin")) for _ in range(50)]
    try:
        await wait_for(
            lambda: emu.requests("POST", f"/resources/get/{FOLDER}") == 100 and gate.held >= 1,
            what="50 loads asking for their parts, and a download at the gate",
        )
    finally:
        gate.open()
    results = await asyncio.gather(*loads)
    assert [(r.status, r.cut) for r in results] == [(200, False)] * 50
    assert all(r.body == data for r in results)
    assert emu.requests("GET", cdn) == 1
    assert emu.downloads(cdn) == 1
    # Each of the 50 found no cache entry (a late one would count as "cache"): one download
    # served them all.
    scraped = Scrape((await client.request("GET", "/metrics"))[1].decode())
    assert scraped.loads() == {"cache": (0, 0), "cdn": (50, 50 * len(data))}
    await scene.assert_after(data)


async def one_connection(socket: Path) -> str:
    """How one bare connection went: "served", or "refused: <reason>"."""
    try:
        reader, writer = await asyncio.open_unix_connection(str(socket))
    except OSError as exc:
        return f"refused: {type(exc).__name__}"
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: loader\r\nConnection: close\r\n\r\n")
        await writer.drain()
        answer = await reader.read()
    except OSError as exc:
        return f"refused: {type(exc).__name__}"
    finally:
        writer.close()
    if answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b'{"status": "healthy"}'):
        return "served"
    if not answer:
        return "refused: closed without an answer"
    return f"answered: {answer[:80]!r}"


async def test_1000_concurrent_connections(start_daemon: StartDaemon) -> None:
    daemon = await start_daemon()
    outcomes = await asyncio.wait_for(
        asyncio.gather(*(one_connection(daemon.scene.socket) for _ in range(1000))), 60
    )
    seen = collections.Counter(outcomes)
    assert seen["served"] > 0, seen
    assert all(o == "served" or o.startswith("refused: ") for o in outcomes), seen
    assert daemon.running, daemon.log()
    assert "Traceback" not in daemon.log()
    await daemon.scene.assert_after()
