"""Fault matrix, disk: the cache on a 1 MB tmpfs that fills up during a load and during an
upload: 507, and nothing partial anywhere."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RunningEmulator, skip_or_fail
from tests.dockerd import mounts_under
from tests.faults.conftest import FOLDER, StartApp, assert_clear_error


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MB tmpfs, unmounted at the end."""
    if os.geteuid() != 0:
        skip_or_fail("mounting a tmpfs needs root")
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=True)
    assert mounts_under(mount) == []


async def test_disk_fills_up_during_a_load(
    start_app: StartApp, emulator: RunningEmulator, tiny_disk: Path
) -> None:
    writer = await start_app()
    client = writer.client()
    assert (await client.login())[0] == 200
    data = os.urandom(3_000_000)
    assert (await client.upload("huge.bin", data))[0] == 200

    reader = await start_app(model_cache_dir=tiny_disk / "models")
    client = reader.client()
    assert (await client.login())[0] == 200
    loaded = await client.load("huge.bin")
    assert_clear_error(loaded.status, loaded.body, 507, "insufficient-storage", "no space left")
    await reader.assert_after(data)
    # Nothing lost: the resource is whole where it was.
    assert emulator.emulator.store.big_path(FOLDER, "huge.bin").exists()
    await writer.assert_after(data)


async def test_disk_fills_up_during_an_upload(
    start_app: StartApp, emulator: RunningEmulator, tiny_disk: Path
) -> None:
    scene = await start_app(model_cache_dir=tiny_disk / "models")
    client = scene.client()
    assert (await client.login())[0] == 200
    data = os.urandom(3_000_000)
    status, body = await client.upload("huge.bin", data)
    assert_clear_error(status, body, 507, "insufficient-storage", "no space left")
    # Nothing half-published: neither part reached the remote.
    assert not emulator.emulator.store.small_path(FOLDER, "huge.bin").exists()
    assert not emulator.emulator.store.big_path(FOLDER, "huge.bin").exists()
    await scene.assert_after(data)
    # The space is back: a small upload fits.
    small = os.urandom(100_000)
    assert (await client.upload("small.bin", small))[0] == 200
    loaded = await client.load("small.bin")
    assert (loaded.status, loaded.body) == (200, small)
    await scene.assert_after(data, small)


async def test_cache_entry_removed_while_it_streams(start_app: StartApp) -> None:
    """Someone cleans the cache while a load streams an entry: the stream holds the file
    open and completes; the next load fetches the entry again from the CDN."""
    scene = await start_app()
    client = scene.client()
    assert (await client.login())[0] == 200
    data = os.urandom(8_000_000)
    assert (await client.upload("gone.bin", data))[0] == 200
    entry = scene.cache / FOLDER / "gone.bin.big"
    async with client.session.post(
        "http://loader/load/gone.bin", json={"filename": "gone.bin", "folder": FOLDER}
    ) as resp:
        assert resp.status == 200
        body = await resp.content.readexactly(1_000_000)
        entry.unlink()
        body += await resp.read()
    assert body == data
    loaded = await client.load("gone.bin")
    assert (loaded.status, loaded.body) == (200, data)
    assert entry.exists()
    await scene.assert_after(data)


async def test_damaged_cache_entry_never_reaches_a_caller_whole(start_app: StartApp) -> None:
    """A byte flipped on disk in a cache entry: the stream is cut before its end (the entry's
    digest does not match), the entry is removed, and the next load is whole and right."""
    scene = await start_app()
    client = scene.client()
    assert (await client.login())[0] == 200
    data = os.urandom(3_000_000)
    assert (await client.upload("rot.bin", data))[0] == 200
    entry = scene.cache / FOLDER / "rot.bin.big"
    with open(entry, "r+b") as damaged:  # noqa: ASYNC230
        damaged.seek(1_500_000)
        byte = damaged.read(1)
        damaged.seek(1_500_000)
        damaged.write(bytes([byte[0] ^ 0x40]))
    loaded = await client.load("rot.bin")
    assert loaded.status == 200
    assert len(loaded.body) < len(data)
    assert not entry.exists()
    loaded = await client.load("rot.bin")
    assert (loaded.status, loaded.body) == (200, data)
    await scene.assert_after(data)
