"""Fault matrix, the image archive: missing, unreadable, truncated, one flipped byte, the
wrong fragment. Each ends in a clear unlock error and no image in Docker."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import RunningEmulator
from tests.dockerd import ArchiveInfo, PrivateDockerd
from tests.faults.conftest import StartApp, assert_clear_error

pytestmark = pytest.mark.docker


async def test_missing(
    start_app: StartApp, private_dockerd: PrivateDockerd, no_stack_images: list[str], tmp_path: Path
) -> None:
    scene = await start_app(private_dockerd, images_path=tmp_path / "absent.enc")
    client = scene.client()
    status, body = await client.unlock()
    assert_clear_error(status, body, 404, "archive-missing", "no image archive at")
    assert (await client.unlock_status())["state"] == "idle"
    await scene.assert_after(images=False)


@contextlib.contextmanager
def fifo(path: Path) -> Iterator[Path]:
    """A named pipe nobody writes to; whoever blocks opening it is let go at the end."""
    os.mkfifo(path)
    try:
        yield path
    finally:
        # A reader stuck in open() is released by a writer coming and going: it reads EOF.
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.parametrize("kind", ["directory", "fifo"])
async def test_unreadable(
    start_app: StartApp,
    private_dockerd: PrivateDockerd,
    no_stack_images: list[str],
    tmp_path: Path,
    kind: str,
) -> None:
    archive = tmp_path / "images.enc"
    with contextlib.ExitStack() as stack:
        if kind == "directory":
            archive.mkdir()  # root reads any file: a folder it cannot read as one
        else:
            stack.enter_context(fifo(archive))
        scene = await start_app(private_dockerd, images_path=archive)
        client = scene.client()
        assert (await client.unlock())[0] == 200
        failed = await client.settled(timeout=10)
        assert failed["state"] == "error", failed
        assert f"the archive {archive}" in failed["error"], failed
    await scene.assert_after(images=False)


def cut_to(size: Callable[[int], int]) -> Callable[[bytearray], None]:
    def cut(data: bytearray) -> None:
        del data[size(len(data)) :]

    return cut


@pytest.mark.parametrize(
    "damage",
    [
        cut_to(lambda n: n - 5),
        cut_to(lambda n: n - 16),
        cut_to(lambda n: n // 2),
        cut_to(lambda n: (n // 2) // 16 * 16),
        cut_to(lambda n: 40),
        cut_to(lambda n: 0),
    ],
    ids=["cut-5", "cut-16", "cut-half", "cut-half-on-a-block", "cut-to-40", "empty"],
)
async def test_truncated(
    start_app: StartApp,
    private_dockerd: PrivateDockerd,
    image_archive: ArchiveInfo,
    no_stack_images: list[str],
    tmp_path: Path,
    damage: Callable[[bytearray], None],
) -> None:
    data = bytearray(image_archive.path.read_bytes())
    damage(data)
    archive = tmp_path / "cut.enc"
    archive.write_bytes(bytes(data))
    scene = await start_app(private_dockerd, images_path=archive)
    client = scene.client()
    assert (await client.unlock())[0] == 200
    failed = await client.settled()
    assert failed["state"] == "error", failed
    # A cut that ends on a block may leave valid-looking padding (1 in 256): Docker then
    # refuses the short tar. Either way, a clear error.
    assert (
        "could not be decrypted" in failed["error"]
        or "too short" in failed["error"]
        or "Docker refused the images" in failed["error"]
    ), failed
    await scene.assert_after(images=False)


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0x01]))


async def test_one_flipped_byte(
    start_app: StartApp,
    private_dockerd: PrivateDockerd,
    big_archive: ArchiveInfo,
    no_stack_images: list[str],
    tmp_path: Path,
) -> None:
    # The middle of the big archive is inside a layer's random content: CBC has no
    # integrity check, so it is Docker's digest of the layer that catches the damage.
    archive = tmp_path / "flipped.enc"
    shutil.copyfile(big_archive.path, archive)
    flip_byte(archive, big_archive.size // 2)
    scene = await start_app(private_dockerd, images_path=archive)
    client = scene.client()
    assert (await client.unlock())[0] == 200
    failed = await client.settled()
    assert failed["state"] == "error", failed
    assert "Docker refused the images" in failed["error"], failed
    assert failed["imagesDone"] < 7, failed
    # The images before the damaged one stay, whole and right: the next unlock resumes.
    await scene.assert_after(archive=big_archive.path)
    scene = await start_app(private_dockerd, images_path=big_archive.path)
    client = scene.client()
    assert (await client.unlock())[0] == 200
    final = await client.settled()
    assert final["state"] == "ready", final
    assert final["bytesTotal"] < big_archive.plaintext_size * (7 - failed["imagesDone"]) / 6
    await scene.assert_after(images=True, archive=big_archive.path)


async def test_wrong_fragment(
    start_app: StartApp,
    emulator: RunningEmulator,
    private_dockerd: PrivateDockerd,
    image_archive: ArchiveInfo,
    no_stack_images: list[str],
) -> None:
    right = emulator.emulator.config
    emulator.emulator.config = replace(right, archive_fragment=b"some-other-fragment")
    scene = await start_app(private_dockerd, images_path=image_archive.path)
    client = scene.client()
    assert (await client.unlock())[0] == 200
    failed = await client.settled()
    assert failed["state"] == "error", failed
    assert "the archive could not be decrypted" in failed["error"], failed
    await scene.assert_after(images=False)
    emulator.emulator.config = right
    assert (await client.unlock())[0] == 200
    assert (await client.settled())["state"] == "ready"
    await scene.assert_after(images=True)
