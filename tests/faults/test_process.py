"""Fault matrix, the process: SIGTERM during an unlock and during a /load stream (graceful,
within SHUTDOWN_GRACE, exit 0, no half stack); SIGKILL in the middle of an unlock, an upload
and a cache write, then a restart: no debris, and the next /unlock and /load succeed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import RunningEmulator, wait_for
from tests.dockerd import ArchiveInfo, PrivateDockerd, present_images
from tests.emulator import FaultRule
from tests.faults.conftest import (
    FOLDER,
    Daemon,
    MiB,
    StartDaemon,
    half_stack,
    partial_files,
)

# Seconds a stopping daemon may take beyond SHUTDOWN_GRACE: the interpreter's own exit.
EXIT_SLACK = 3.0


def assert_stopped_cleanly(daemon: Daemon, code: int) -> None:
    log = daemon.log()
    assert code == 0, log
    assert "Traceback" not in log, log
    assert "stopped" in log.splitlines()[-1], log
    assert not daemon.scene.socket.exists()


@pytest.mark.docker
async def test_sigterm_during_an_unlock(
    start_daemon: StartDaemon,
    private_dockerd: PrivateDockerd,
    big_archive: ArchiveInfo,
    no_stack_images: list[str],
) -> None:
    grace = 5.0
    daemon = await start_daemon(private_dockerd, images_path=big_archive.path, shutdown_grace=grace)
    client = daemon.scene.client()
    assert (await client.unlock())[0] == 200
    await client.loading()
    code = await daemon.terminate(grace + EXIT_SLACK)
    assert_stopped_cleanly(daemon, code)
    assert "unlock failed: stopped: the daemon shut down during the unlock" in daemon.log()
    # What completed before the stop stays, whole and right; nothing else.
    daemon.scene.assert_clean(archive=big_archive.path)


@pytest.mark.parametrize("reader", ["reading", "stalled"])
async def test_sigterm_during_a_load_stream(start_daemon: StartDaemon, reader: str) -> None:
    # Reading: room to finish even on a busy machine (the exit follows the stream's end).
    grace = 10.0 if reader == "reading" else 2.0
    daemon = await start_daemon(shutdown_grace=grace)
    client = daemon.scene.client()
    assert (await client.login())[0] == 200
    data = os.urandom(16 * MiB)
    assert (await client.upload("long.bin", data))[0] == 200

    async with (
        aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(daemon.scene.socket))
        ) as session,
        session.post(
            "http://loader/load/long.bin", json={"filename": "long.bin", "folder": FOLDER}
        ) as resp,
    ):
        assert resp.status == 200
        body = bytearray(await resp.content.readexactly(100_000))
        daemon.proc.send_signal(signal.SIGTERM)
        if reader == "reading":
            # The request in flight finishes: the whole body, then a clean exit. The caller
            # reads slower than the daemon writes (as a busy service does): what the daemon
            # has buffered when its handler returns must still reach it.
            body += await asyncio.wait_for(slowly(resp.content), grace)
            assert len(body) == len(data)
            assert bytes(body) == data
            code = await daemon.exited(grace + EXIT_SLACK)
        else:
            # A caller that stops reading does not hold the daemon past the grace: its
            # stream is cut, and the caller sees it short.
            code = await daemon.exited(grace + EXIT_SLACK)
            with contextlib.suppress(aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
                body += await asyncio.wait_for(resp.content.read(), 5)
            assert len(body) < len(data)
    assert_stopped_cleanly(daemon, code)
    daemon.scene.assert_clean(data)


async def slowly(content: aiohttp.StreamReader, rate: float = 32e6) -> bytes:
    """The rest of a body, read at about `rate` bytes a second."""
    body = bytearray()
    while chunk := await content.read(256 * 1024):
        body += chunk
        await asyncio.sleep(len(chunk) / rate)  # pacing, not waiting for anything
    return bytes(body)


async def gated(first: int, gate: asyncio.Event) -> AsyncIterator[bytes]:
    """`first` random bytes, then nothing until `gate` opens (it never does)."""
    for _ in range(first // (256 * 1024)):
        yield os.urandom(256 * 1024)
    await gate.wait()
    yield b"never sent"


def upload_body(chunks: AsyncIterator[bytes]) -> aiohttp.MultipartWriter:
    body = aiohttp.MultipartWriter("form-data")
    body.append(FOLDER).set_content_disposition("form-data", name="folder")
    body.append(chunks, {"Content-Type": "application/octet-stream"}).set_content_disposition(
        "form-data", name="data", filename="big.bin"
    )
    return body


async def quietly(task: asyncio.Task[object]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError, OSError):
        await task


async def partial_of_at_least(cache: Path, size: int) -> Path:
    def grown() -> Path | None:
        for path in partial_files(cache):
            with contextlib.suppress(OSError):
                if path.stat().st_size >= size:
                    return path
        return None

    found: Path = await wait_for(grown, 20, f"a partial cache file of {size} bytes")
    return found


@pytest.mark.docker
@pytest.mark.parametrize("moment", ["unlock", "upload", "cache-write"])
async def test_sigkill_then_restart(
    start_daemon: StartDaemon,
    emulator: RunningEmulator,
    private_dockerd: PrivateDockerd,
    image_archive: ArchiveInfo,
    big_archive: ArchiveInfo,
    no_stack_images: list[str],
    moment: str,
) -> None:
    archive = big_archive if moment == "unlock" else image_archive
    first = await start_daemon(private_dockerd, images_path=archive.path)
    client = first.scene.client()
    assert (await client.login())[0] == 200
    data = os.urandom(3 * MiB)
    assert (await client.upload("kept.bin", data))[0] == 200
    cache = first.scene.cache

    kept: list[str] = []
    if moment == "unlock":
        assert (await client.unlock())[0] == 200

        async def two_loaded() -> bool:
            status = await client.unlock_status()
            assert status["state"] != "error", status
            return 2 <= status["imagesDone"] < len(no_stack_images)

        # In the middle of the stack: at least two images done, not all.
        await wait_for(two_loaded, 120, "two images to be loaded")
        await first.kill()
        kept = present_images(private_dockerd, no_stack_images)
        assert 2 <= len(kept) < len(no_stack_images), kept
    elif moment == "upload":
        gate = asyncio.Event()
        upload = asyncio.create_task(
            client.session.post(
                "http://loader/upload/new.bin", data=upload_body(gated(6 * MiB, gate))
            )
        )
        await partial_of_at_least(cache, MiB)
        await first.kill()
        await quietly(upload)
    else:
        (cache / FOLDER / "kept.bin.big").unlink()
        cdn = f"/cdn/{FOLDER}/kept.bin.big"
        emulator.emulator.add_rules(
            [
                FaultRule(method="GET", path_prefix=cdn, kind="truncate", truncate_at=3 * MiB // 2),
                FaultRule(method="GET", path_prefix=cdn, kind="delay", delay=3.0),
            ]
        )
        load = asyncio.create_task(client.load("kept.bin", limit=30))
        await partial_of_at_least(cache, MiB)
        await first.kill()
        await quietly(load)
    if moment != "unlock":
        assert partial_files(cache), "the kill was meant to leave a partial file"
    emulator.emulator.clear_faults()

    second = await start_daemon(private_dockerd, images_path=archive.path)
    # The daemon removes the partial files at start (in the background, as it serves).
    await wait_for(lambda: partial_files(cache) == [], 10, "the partial files to go")
    if moment != "unlock":
        await wait_for(
            lambda: "removed 1 partial cache files left by an earlier run" in second.log(),
            5,
            "the daemon to say it removed the partial file",
        )
    # Docker dropped the image the kill cut; those completed before it are whole and right.
    assert half_stack(private_dockerd, archive=archive.path) == []
    client = second.scene.client()
    assert (await client.unlock())[0] == 200  # logs in: the credentials are the daemon's again
    final = await client.settled()
    assert final["state"] == "ready", final
    if moment == "unlock":  # only the missing images were sent
        missing = len(no_stack_images) - len(kept)
        assert f"unlock: loading {missing} of {len(no_stack_images)} images" in second.log()
    loaded = await client.load("kept.bin")
    assert (loaded.status, loaded.body) == (200, data)
    await second.scene.assert_after(data, images=True)
