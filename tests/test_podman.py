"""/unlock into Podman (Debian 12's 4.3) through its Docker-compatible API: image by image,
each ID checked, resumed after a failure, and errors that name the engine at DOCKER_HOST."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from loader.crypto import key_from_fragment
from loader.images import Docker
from loader.settings import Settings
from tests.blobs import encrypt
from tests.conftest import (
    ARCHIVE_FRAGMENT,
    EMAIL,
    PASSWORD,
    LocalApp,
    archive_ids,
    skip_or_fail,
    wait_for,
)
from tests.dockerd import STACK_NAMES, MiB, layer_tar, legacy_save, stack_tags
from tests.podman import PodmanError, PrivatePodman

STACK = stack_tags("latest", STACK_NAMES)


@pytest.fixture(scope="module")
def podman() -> Iterator[PrivatePodman]:
    reason = PrivatePodman.available()
    if reason:
        skip_or_fail(reason)
    service = PrivatePodman()
    try:
        service.start()
    except PodmanError as exc:
        skip_or_fail(f"the private Podman service did not start: {exc}")
    yield service
    service.stop()


@pytest.fixture
def engine(podman: PrivatePodman) -> Iterator[Docker]:
    """The loader's own client of the Podman service; the stack removed before and after."""
    docker = Docker(podman.host)
    docker.remove(list(docker.inspect(STACK)))
    yield docker
    docker.remove(list(docker.inspect(STACK)))
    docker.close()


def stack_layers() -> dict[str, list[bytes]]:
    """The stack on a shared base: each image the base and a layer of its own."""
    base = layer_tar("base", 2 * MiB)
    return {tag: [base, layer_tar(tag, 128 * 1024)] for tag in STACK}


def write_stack(path: Path, layers: dict[str, list[bytes]], damaged: str | None = None) -> Path:
    """The stack encrypted as an archive; `damaged`'s own layer has a byte flipped."""
    plaintext = bytearray(legacy_save(layers))
    if damaged is not None:
        own = layers[damaged][1]
        plaintext[plaintext.find(own) + len(own) // 2] ^= 0x01
    path.write_bytes(encrypt(key_from_fragment(ARCHIVE_FRAGMENT), bytes(plaintext)))
    return path


async def unlock(app: LocalApp) -> dict[str, Any]:
    async with app.session.post(
        app.url("/unlock"), json={"email": EMAIL, "password": PASSWORD}
    ) as resp:
        assert resp.status == 200, await resp.text()

    async def settled() -> dict[str, Any] | None:
        async with app.session.get(app.url("/unlock/status")) as resp:
            status: dict[str, Any] = await resp.json()
        return status if status["state"] in ("ready", "error") else None

    result: dict[str, Any] = await wait_for(settled, 120, "the unlock to settle")
    return result


@pytest.fixture
def start(
    make_local_app: Callable[[Settings], Any],
    with_settings: Callable[..., Settings],
    podman: PrivatePodman,
) -> Callable[..., Any]:
    async def start(**changes: Any) -> LocalApp:
        settings = with_settings(**{"docker_host": podman.host, **changes})
        app: LocalApp = await make_local_app(settings)
        return app

    return start


def podman_images(podman: PrivatePodman) -> list[dict[str, Any]]:
    """GET /images/json from the service."""
    import docker

    with docker.APIClient(base_url=podman.host, version="auto") as api:
        listed: list[dict[str, Any]] = api.images()
    return listed


async def test_the_stack_loads_into_podman_with_the_archive_ids(
    start: Callable[..., Any], engine: Docker, podman: PrivatePodman, tmp_path: Path
) -> None:
    archive = write_stack(tmp_path / "images.enc", stack_layers())
    final = await unlock(await start(images_path=archive))
    assert final["state"] == "ready", final
    ids = archive_ids(archive)
    assert {tag: image.id for tag, image in engine.inspect(STACK).items()} == ids
    # Named as `podman load` names them, the first (sent whole, as a docker-archive) and
    # the thin ones (OCI) alike.
    names = {tag for image in podman_images(podman) for tag in image.get("RepoTags") or ()}
    assert {f"localhost/{tag}" for tag in STACK} <= names, names
    # Thin: the shared base went once.
    assert final["bytesTotal"] < 2 * MiB + 7 * 160 * 1024


async def test_a_failed_unlock_on_podman_keeps_what_it_completed_and_resumes(
    start: Callable[..., Any], engine: Docker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    layers = stack_layers()
    damaged = write_stack(tmp_path / "damaged.enc", layers, damaged=STACK[3])
    with caplog.at_level(logging.WARNING, logger="loader.unlock"):
        failed = await unlock(await start(images_path=damaged))
    assert failed["state"] == "error", failed
    assert f"(loading {STACK[3]})" in failed["error"], failed
    # A refused thin load is tried once more whole (for engines that take no thin tar),
    # and the image's own damage is refused again.
    assert f"Podman refused {STACK[3]} without the layers it has" in caplog.text
    assert "sending it whole" in caplog.text
    kept = engine.inspect(STACK)
    # Podman loads two at a time: images started beside the damaged one may be in too.
    assert set(STACK[:3]) <= set(kept), sorted(kept)
    assert STACK[3] not in kept, sorted(kept)
    good = write_stack(tmp_path / "good.enc", layers)
    ids = archive_ids(good)
    assert {tag: image.id for tag, image in kept.items()} == {tag: ids[tag] for tag in kept}

    final = await unlock(await start(images_path=good))
    assert final["state"] == "ready", final
    assert {tag: image.id for tag, image in engine.inspect(STACK).items()} == ids
    # Only the missing images went, without the base the engine has.
    assert final["imagesDone"] == 7, final
    assert final["bytesTotal"] < (7 - len(kept)) * 160 * 1024, final


async def test_an_engine_away_is_named_as_at_docker_host(
    start: Callable[..., Any], tmp_path: Path, short_dir: Path
) -> None:
    archive = write_stack(tmp_path / "images.enc", stack_layers())
    away = f"unix://{short_dir}/podman.sock"
    failed = await unlock(await start(images_path=archive, docker_host=away))
    assert failed["state"] == "error", failed
    assert f"cannot reach the container engine at {short_dir}/podman.sock" in failed["error"]
    assert "podman.socket" in failed["error"]


async def test_podman_s_refusals_are_named_podman_s(
    start: Callable[..., Any], engine: Docker, tmp_path: Path
) -> None:
    layers = stack_layers()
    failed = await unlock(
        await start(images_path=write_stack(tmp_path / "d.enc", layers, STACK[0]))
    )
    assert failed["state"] == "error", failed
    assert failed["error"].startswith("Podman refused"), failed
    assert "Docker" not in failed["error"]


async def test_podman_s_temporary_folder_too_small_is_refused_up_front(
    make_local_app: Callable[[Settings], Any],
    with_settings: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    """Podman spools a load into its temporary folder (TMPDIR, else /var/tmp) twice over:
    the preflight reads where from Podman and checks it, before a byte is sent."""
    small = PrivatePodman(tmp_size="16m")
    try:
        small.start()
    except PodmanError as exc:
        skip_or_fail(f"the private Podman service did not start: {exc}")
    try:
        archive = write_stack(tmp_path / "images.enc", stack_layers())
        app = await make_local_app(with_settings(docker_host=small.host, images_path=archive))
        failed = await unlock(app)
        assert failed["state"] == "error", failed
        assert failed["error"].startswith("Podman needs about"), failed
        assert f"under {small.tmp}" in failed["error"], failed
        assert "is free" in failed["error"], failed
        engine = Docker(small.host)
        try:
            assert engine.inspect(STACK) == {}
        finally:
            engine.close()  # urllib3 1.26 (Debian 12's) warns of a pooled socket left to the GC
    finally:
        small.stop()
