"""Fault matrix, Docker: absent when the daemon starts, killed in the middle of a load and
back, a load that Docker rejects."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from loader.crypto import key_from_fragment
from tests.blobs import encrypt
from tests.conftest import ARCHIVE_FRAGMENT
from tests.dockerd import ArchiveInfo, PrivateDockerd, layer_tar, legacy_save, present_images
from tests.faults.conftest import STACK, StartApp, StartDaemon, assert_clear_error


def junk_archive(path: Path, size: int = 100_000) -> Path:
    """An archive that decrypts with the right fragment, but whose plaintext is not a tar."""
    path.write_bytes(encrypt(key_from_fragment(ARCHIVE_FRAGMENT), os.urandom(size)))
    return path


async def test_docker_absent_at_start(
    start_daemon: StartDaemon, short_dir: Path, tmp_path: Path
) -> None:
    absent = f"unix://{short_dir}/no-docker.sock"
    archive = junk_archive(tmp_path / "images.enc")
    daemon = await start_daemon(docker_host=absent, images_path=archive)
    client = daemon.scene.client()
    await client.health()
    # With the archive there, the unlock starts and says in its error that Docker is away.
    status, body = await client.unlock()
    assert status == 200, body
    final = await client.settled(timeout=30)
    assert final["state"] == "error", final
    assert "cannot reach the container engine at" in final["error"], final
    assert "Traceback" not in final["error"]
    await daemon.scene.assert_after()
    # Without it, there is nothing to start: Docker's absence is the answer.
    archive.unlink()
    status, body = await client.unlock()
    assert_clear_error(status, body, 503, "docker-unavailable", "cannot reach the container engine")
    await daemon.scene.assert_after()
    assert daemon.running


@pytest.mark.docker
async def test_docker_killed_in_the_middle_of_a_load_then_back(
    start_app: StartApp,
    dockerd_back: PrivateDockerd,
    big_archive: ArchiveInfo,
    no_stack_images: list[str],
) -> None:
    scene = await start_app(dockerd_back, images_path=big_archive.path)
    client = scene.client()
    assert (await client.unlock())[0] == 200
    await client.loading()
    dockerd_back.kill()
    failed = await client.settled(timeout=30)
    assert failed["state"] == "error", failed
    assert "Docker" in failed["error"], failed
    await client.health()
    dockerd_back.start()
    # What the cut load completed is whole and right; the image it was in is not there.
    await scene.assert_after(archive=big_archive.path)
    kept = present_images(dockerd_back, STACK)
    assert len(kept) < len(STACK)
    assert (await client.unlock())[0] == 200
    final = await client.settled()
    assert final["state"] == "ready", final
    await scene.assert_after(images=True, archive=big_archive.path)


@pytest.mark.docker
async def test_a_load_that_docker_rejects(
    start_app: StartApp,
    private_dockerd: PrivateDockerd,
    no_stack_images: list[str],
    tmp_path: Path,
) -> None:
    """A docker save tar of the stack whose configs name layers it does not hold."""
    lying = legacy_save({tag: [layer_tar(tag, 4096)] for tag in STACK}, diff_ids_lie=True)
    archive = tmp_path / "lying.enc"
    archive.write_bytes(encrypt(key_from_fragment(ARCHIVE_FRAGMENT), lying))
    scene = await start_app(private_dockerd, images_path=archive)
    client = scene.client()
    assert (await client.unlock())[0] == 200
    failed = await client.settled()
    assert failed["state"] == "error", failed
    assert "Docker refused the images" in failed["error"], failed
    assert f"(loading {STACK[0]})" in failed["error"], failed
    await scene.assert_after(images=False)
