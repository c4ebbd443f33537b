"""Fault matrix, load: 50 concurrent /unlock (one workflow), 50 concurrent /load (one
download), 1,000 concurrent connections on the socket (each served, or refused by the
kernel when the listen backlog is full; never dropped by the daemon)."""

from __future__ import annotations

import asyncio
import collections
import errno
import os
from pathlib import Path

import pytest

from tests.conftest import RunningEmulator, wait_for
from tests.dockerd import ArchiveInfo, PrivateDockerd
from tests.faults.conftest import FOLDER, StartApp, StartDaemon
from tests.test_metrics import Scrape

# A connection the kernel refused has no peer (see one_connection).
KERNEL_REFUSALS = {"refused: ENOTCONN"}
BACKLOG = 128  # loader/server.py listens with it


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
    """How one bare connection went: "served" (200 and the health body), "refused: <errno>"
    when the kernel refused it (the listen backlog was full: connect() failed with EAGAIN,
    which asyncio takes for "in progress", so the socket is left without a peer), or what
    else happened, which must never happen."""
    try:
        reader, writer = await asyncio.open_unix_connection(str(socket))
    except OSError as exc:
        return f"connect failed: {errno.errorcode.get(exc.errno or 0, type(exc).__name__)}"
    try:
        try:
            writer.get_extra_info("socket").getpeername()
        except OSError as exc:
            return f"refused: {errno.errorcode.get(exc.errno or 0, type(exc).__name__)}"
        writer.write(b"GET /health HTTP/1.1\r\nHost: loader\r\nConnection: close\r\n\r\n")
        await writer.drain()
        answer = await reader.read()
    except OSError as exc:
        return f"broken after connect: {type(exc).__name__}"
    finally:
        writer.close()
    if answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b'{"status": "healthy"}'):
        return "served"
    if not answer:
        return "closed without an answer"
    return f"answered: {answer[:80]!r}"


async def test_1000_concurrent_connections(start_daemon: StartDaemon) -> None:
    # The daemon has no connection limit of its own (README, fault matrix): each connection
    # it accepts is served; only the kernel refuses, when the listen backlog is full.
    daemon = await start_daemon(log_level="DEBUG")  # one access line per request

    def health_lines() -> int:
        return daemon.log().count('"GET /health" 200 ')

    before = health_lines()
    outcomes = await asyncio.wait_for(
        asyncio.gather(*(one_connection(daemon.scene.socket) for _ in range(1000))), 60
    )
    seen = collections.Counter(outcomes)
    refused = sum(n for outcome, n in seen.items() if outcome in KERNEL_REFUSALS)
    assert seen["served"] + refused == 1000, seen
    assert seen["served"] > BACKLOG, seen
    # The daemon answered exactly the served ones: the refused ones never reached it.
    await wait_for(lambda: health_lines() >= before + seen["served"], what="the access log")
    assert health_lines() == before + seen["served"], seen
    assert daemon.running, daemon.log()
    assert "Traceback" not in daemon.log()
    await daemon.scene.assert_after()
