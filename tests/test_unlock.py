"""/unlock against a private dockerd and the emulator: the whole workflow and each way it fails."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from loader.crypto import key_from_fragment
from loader.progress import (
    ESTIMATE_CAP,
    SEND_SHARE,
    Progress,
    UnlockState,
    handed_over,
    land,
    percent_done,
    registered,
    take_off,
)
from loader.settings import Settings
from tests.blobs import encrypt
from tests.conftest import (
    ARCHIVE_FRAGMENT,
    EMAIL,
    PASSWORD,
    LocalApp,
    NotifyListener,
    RunningEmulator,
    archive_ids,
    daemon_env,
    loader_command,
    session_for,
    skip_or_fail,
    socket_answers,
    stop,
    wait_for,
)
from tests.dockerd import (
    ArchiveInfo,
    MiB,
    PrivateDockerd,
    build_stack_images,
    image_ids,
    layer_tar,
    legacy_save,
    oci_save,
    present_images,
    remove_images,
    write_archive,
)
from tests.emulator import FaultRule

pytestmark = pytest.mark.docker

Start = Callable[..., Any]


@pytest.fixture
def start(
    make_local_app: Callable[[Settings], Any],
    with_settings: Callable[..., Settings],
    private_dockerd: PrivateDockerd,
    image_archive: ArchiveInfo,
) -> Start:
    """The app against the private dockerd and the test archive, with any setting changed."""

    async def start(**changes: Any) -> LocalApp:
        defaults = {"docker_host": private_dockerd.host, "images_path": image_archive.path}
        settings = with_settings(**{**defaults, **changes})
        app: LocalApp = await make_local_app(settings)
        return app

    return start


async def post_unlock(app: LocalApp, password: str = PASSWORD) -> tuple[int, Any]:
    async with app.session.post(
        app.url("/unlock"), json={"email": EMAIL, "password": password}
    ) as resp:
        return resp.status, await resp.json()


async def unlock_status(app: LocalApp) -> Any:
    async with app.session.get(app.url("/unlock/status")) as resp:
        assert resp.status == 200
        return await resp.json()


async def settled(app: LocalApp, timeout: float = 120) -> Any:
    """The unlock status once it is ready or failed."""

    async def done() -> Any:
        status = await unlock_status(app)
        return status if status["state"] in ("ready", "error") else None

    return await wait_for(done, timeout=timeout, what="the unlock to settle")


async def test_unlock_loads_all_seven_images(
    start: Start,
    private_dockerd: PrivateDockerd,
    image_archive: ArchiveInfo,
    no_stack_images: list[str],
) -> None:
    app = await start()
    assert await unlock_status(app) == {
        "state": "idle",
        "error": None,
        "bytesDone": 0,
        "bytesTotal": 0,
        "percent": 0.0,
        "images": [],
        "imagesDone": 0,
        "imagesTotal": 0,
        "image": None,
    }
    status, body = await post_unlock(app)
    assert (status, body) == (200, {"state": "authenticating"})
    final = await settled(app)
    assert final["state"] == "ready", final
    assert final["error"] is None
    assert sorted(final["images"]) == sorted(no_stack_images)
    # What was sent: the images' configs and layers, not the archive's own tar framing.
    assert 0 < final["bytesDone"] == final["bytesTotal"] < image_archive.plaintext_size
    assert (final["percent"], final["imagesDone"], final["imagesTotal"]) == (100.0, 7, 7)
    assert final["image"] is None
    assert sorted(present_images(private_dockerd, no_stack_images)) == sorted(no_stack_images)
    # The unlock's credentials are now the daemon's.
    async with app.session.get(app.url("/status")) as resp:
        assert (await resp.json())["authenticated"] is True


async def test_images_present_means_ready_without_archive_or_api(
    start: Start,
    private_dockerd: PrivateDockerd,
    emulator: RunningEmulator,
    image_archive: ArchiveInfo,
    no_stack_images: list[str],
    tmp_path: Path,
) -> None:
    build_stack_images(private_dockerd, "latest")
    logins = emulator.emulator.stats()["logins"]
    app = await start(images_path=tmp_path / "absent.enc")
    assert await post_unlock(app) == (200, {"state": "ready"})
    assert (await unlock_status(app))["state"] == "ready"
    assert emulator.emulator.stats()["logins"] == logins


async def test_no_archive_and_images_missing_is_404(
    start: Start, no_stack_images: list[str], tmp_path: Path
) -> None:
    app = await start(images_path=tmp_path / "absent.enc")
    status, body = await post_unlock(app)
    assert status == 404
    assert body["code"] == "archive-missing"
    assert "no image archive at" in body["detail"]
    assert (await unlock_status(app))["state"] == "idle"


async def test_wrong_password_then_right(start: Start, no_stack_images: list[str]) -> None:
    app = await start()
    await post_unlock(app, password="not-it")
    failed = await settled(app)
    assert failed["state"] == "error"
    assert failed["error"] == "wrong email or password"
    assert "not-it" not in str(failed)
    await post_unlock(app)
    assert (await settled(app))["state"] == "ready"


async def test_api_failing_then_back(
    start: Start, emulator: RunningEmulator, no_stack_images: list[str]
) -> None:
    emulator.emulator.add_rule(
        FaultRule(
            method="GET",
            path_prefix="/binary-split/key-fragment",
            kind="status",
            status=503,
            count=None,
        )
    )
    app = await start(api_retries=1)
    await post_unlock(app)
    failed = await settled(app)
    assert failed["state"] == "error"
    assert "HTTP 503" in failed["error"]
    async with app.session.get(app.url("/health")) as resp:
        assert resp.status == 200
    emulator.emulator.clear_faults()
    await post_unlock(app)
    assert (await settled(app))["state"] == "ready"


async def test_api_down(start: Start, no_stack_images: list[str], unused_tcp_port: int) -> None:
    app = await start(resource_api_url=f"http://127.0.0.1:{unused_tcp_port}", api_retries=0)
    await post_unlock(app)
    failed = await settled(app)
    assert failed["state"] == "error"
    assert "could not reach the Resource API" in failed["error"]


async def test_wrong_fragment_is_an_error_then_the_right_one_works(
    start: Start,
    emulator: RunningEmulator,
    private_dockerd: PrivateDockerd,
    no_stack_images: list[str],
) -> None:
    right = emulator.emulator.config
    emulator.emulator.config = replace(right, archive_fragment=b"some-other-fragment")
    app = await start()
    await post_unlock(app)
    failed = await settled(app)
    assert failed["state"] == "error"
    assert "the archive could not be decrypted" in failed["error"]
    assert present_images(private_dockerd, no_stack_images) == []
    emulator.emulator.config = right
    await post_unlock(app)
    assert (await settled(app))["state"] == "ready"


def damaged_copy(source: Path, target: Path, damage: Callable[[bytearray], None]) -> Path:
    data = bytearray(source.read_bytes())
    damage(data)
    target.write_bytes(bytes(data))
    return target


def flip_middle(data: bytearray) -> None:
    data[len(data) // 2] ^= 0x01


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda d: d.__delitem__(slice(-5, None)), "could not be decrypted"),
        (lambda d: d.__delitem__(slice(-16, None)), "could not be decrypted"),
        (lambda d: d.__delitem__(slice(len(d) // 2, None)), "could not be decrypted"),
    ],
    ids=["cut-5", "cut-16", "cut-half"],
)
async def test_damaged_archive_is_an_error_and_leaves_no_image(
    start: Start,
    private_dockerd: PrivateDockerd,
    image_archive: ArchiveInfo,
    no_stack_images: list[str],
    tmp_path: Path,
    damage: Callable[[bytearray], None],
    expected: str,
) -> None:
    archive = damaged_copy(image_archive.path, tmp_path / "damaged.enc", damage)
    app = await start(images_path=archive)
    await post_unlock(app)
    failed = await settled(app)
    assert failed["state"] == "error"
    assert expected in failed["error"]
    assert present_images(private_dockerd, no_stack_images) == []


async def test_a_flipped_byte_stops_at_its_image_and_the_next_unlock_resumes(
    start: Start,
    private_dockerd: PrivateDockerd,
    big_archive: ArchiveInfo,
    no_stack_images: list[str],
    tmp_path: Path,
) -> None:
    # In the big archive, the middle is inside a layer's random content: CBC has no
    # integrity check, so it is Docker's digest of the layer that catches the damage.
    archive = damaged_copy(big_archive.path, tmp_path / "flipped.enc", flip_middle)
    app = await start(images_path=archive)
    await post_unlock(app)
    failed = await settled(app)
    assert failed["state"] == "error"
    assert "Docker refused the images" in failed["error"]
    kept = present_images(private_dockerd, no_stack_images)
    damaged = failed["error"].rpartition("(loading ")[2].rstrip(")")
    assert damaged in no_stack_images
    assert damaged not in kept
    assert sorted(kept) == sorted(failed["images"])
    assert len(kept) == failed["imagesDone"] < 7
    # What was completed is whole, under its tag, with the archive's ID.
    ids = archive_ids(big_archive.path)
    assert image_ids(private_dockerd, kept) == {tag: ids[tag] for tag in kept}

    app = await start(images_path=big_archive.path)
    await post_unlock(app)
    final = await settled(app)
    assert final["state"] == "ready", final
    assert image_ids(private_dockerd, no_stack_images) == ids
    # Only what was missing was sent.
    assert final["bytesTotal"] < big_archive.plaintext_size - len(kept) * 40 * 2**20


async def test_unreadable_archive(start: Start, no_stack_images: list[str], tmp_path: Path) -> None:
    archive = tmp_path / "images.enc"
    archive.mkdir()  # root reads any file; a folder it cannot read as one
    app = await start(images_path=archive)
    await post_unlock(app)
    failed = await settled(app)
    assert failed["state"] == "error"
    assert f"cannot read the archive {archive}" in failed["error"]


async def test_docker_down(start: Start, short_dir: Path) -> None:
    app = await start(docker_host=f"unix://{short_dir}/no-docker.sock")
    await post_unlock(app)
    failed = await settled(app)
    assert failed["state"] == "error"
    assert f"cannot reach the container engine at {short_dir}/no-docker.sock" in failed["error"]


async def test_an_archive_that_is_not_a_docker_save_never_reaches_docker(
    start: Start, private_dockerd: PrivateDockerd, no_stack_images: list[str], tmp_path: Path
) -> None:
    not_a_tar = tmp_path / "junk.enc"
    not_a_tar.write_bytes(encrypt(key_from_fragment(ARCHIVE_FRAGMENT), os.urandom(100_000)))
    app = await start(images_path=not_a_tar)
    await post_unlock(app)
    failed = await settled(app)
    assert failed["state"] == "error"
    assert "not a docker save tar" in failed["error"]
    assert failed["bytesDone"] == 0


async def test_an_archive_without_an_image_of_the_stack_loads_nothing(
    start: Start,
    private_dockerd: PrivateDockerd,
    no_stack_images: list[str],
    tmp_path: Path,
) -> None:
    six = no_stack_images[:-1]
    build_stack_images(private_dockerd, "latest")
    archive = write_archive(private_dockerd, six, ARCHIVE_FRAGMENT, tmp_path / "six.enc")
    remove_images(private_dockerd, no_stack_images)
    app = await start(images_path=archive.path)
    await post_unlock(app)
    failed = await settled(app)
    assert failed["state"] == "error"
    assert f"the archive does not hold {no_stack_images[-1]}" in failed["error"]
    assert present_images(private_dockerd, no_stack_images) == []


@pytest.mark.parametrize("layout", ["legacy", "oci"])
async def test_a_stack_on_a_shared_base_sends_the_base_once(
    start: Start,
    private_dockerd: PrivateDockerd,
    no_stack_images: list[str],
    tmp_path: Path,
    layout: str,
) -> None:
    """Both layouts of docker save: Docker <= 24's `<id>/layer.tar`, and the OCI layout of
    Docker >= 25, whose manifest.json points into blobs/."""
    base = layer_tar("base", 4 * MiB)
    stack = {tag: [base, layer_tar(tag, 256 * 1024)] for tag in no_stack_images}
    plaintext = (oci_save if layout == "oci" else legacy_save)(stack)
    archive = tmp_path / "images.enc"
    archive.write_bytes(encrypt(key_from_fragment(ARCHIVE_FRAGMENT), plaintext))
    app = await start(images_path=archive)
    await post_unlock(app)
    final = await settled(app)
    assert final["state"] == "ready", final
    assert image_ids(private_dockerd, no_stack_images) == archive_ids(archive)
    # The base went once: a bit more than it, and seven small layers.
    assert 4 * MiB < final["bytesTotal"] < 4 * MiB + 7 * 300 * 1024


async def test_docker_dying_mid_load_then_back(
    start: Start,
    private_dockerd: PrivateDockerd,
    big_archive: ArchiveInfo,
    no_stack_images: list[str],
) -> None:
    app = await start(images_path=big_archive.path)
    await post_unlock(app)

    async def feeding() -> bool:
        status = await unlock_status(app)
        return (
            status["state"] == "loading_images" and 0 < status["bytesDone"] < status["bytesTotal"]
        )

    await wait_for(feeding, what="the load to be under way")
    # Meanwhile the daemon answers at once.
    async with app.session.get(app.url("/health")) as resp:
        assert resp.status == 200
    private_dockerd.kill()
    failed = await settled(app)
    assert failed["state"] == "error"
    assert "Docker" in failed["error"]
    private_dockerd.start()
    await post_unlock(app)
    assert (await settled(app))["state"] == "ready"
    assert sorted(present_images(private_dockerd, no_stack_images)) == sorted(no_stack_images)


@pytest.fixture
def tiny_dockerd(tmp_path: Path) -> Iterator[PrivateDockerd]:
    """A dockerd whose data root is a 64 MB tmpfs."""
    root = tmp_path / "tiny"
    root.mkdir()
    if shutil.which("mount") is None:
        skip_or_fail("no mount command")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(root)], check=True)
    daemon = PrivateDockerd(root=root)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
        subprocess.run(["umount", "-l", str(root)], check=False)


async def test_not_enough_space_for_docker_is_refused_up_front(
    start: Start, tiny_dockerd: PrivateDockerd, big_archive: ArchiveInfo
) -> None:
    app = await start(docker_host=tiny_dockerd.host, images_path=big_archive.path)
    await post_unlock(app)
    failed = await settled(app)
    assert failed["state"] == "error"
    assert "Docker needs about" in failed["error"]
    assert "is free" in failed["error"]


async def test_status_lines_reach_systemd(
    spawn: Any,
    settings: Settings,
    notify: NotifyListener,
    private_dockerd: PrivateDockerd,
    big_archive: ArchiveInfo,
    no_stack_images: list[str],
) -> None:
    env = daemon_env(
        settings,
        NOTIFY_SOCKET=str(notify.path),
        DOCKER_HOST=private_dockerd.host,
        IMAGES_PATH=str(big_archive.path),
    )
    proc = await spawn(*loader_command(), "serve", env=env)
    await notify.wait_for("READY=1")
    assert socket_answers(settings.socket_path)
    async with (
        session_for(settings.socket_path) as session,
        session.post("http://loader/unlock", json={"email": EMAIL, "password": PASSWORD}) as resp,
    ):
        assert resp.status == 200
    seen: list[str] = []
    while not any(line.startswith("STATUS=Ready") for line in seen):
        seen.extend((await notify.next(timeout=120)).split("\n"))
    progress = [line for line in seen if line.startswith("STATUS=Unlocking: loading image ")]
    assert progress, seen
    assert progress[0].startswith("STATUS=Unlocking: loading image 1 of 7, ")
    assert progress[0].endswith(" GB)")
    assert any(line.startswith("STATUS=Unlocking: loading image 7 of 7, ") for line in seen)
    assert "STATUS=Ready: 7 images at latest" in seen
    code, err = await stop(proc)
    assert code == 0, err


def test_percent_moves_on_while_the_engine_registers_but_never_claims_it_done() -> None:
    """The engine says nothing while it registers an image: `percent` moves on at the rate
    it has shown, up to ESTIMATE_CAP of that image's part, and the rest only when it answers."""
    total = 1000
    progress = Progress(state=UnlockState.LOADING_IMAGES, bytes_total=total)
    first = take_off(progress, "a", 400)
    first.sent = 400
    assert percent_done(progress) == 100 * SEND_SHARE * 400 / total
    handed_over(progress, first, 400, seconds=1.0)
    assert percent_done(progress) < 100 * (SEND_SHARE * 400 + (1 - SEND_SHARE) * 400 * 0.05) / total
    assert first.registering_since is not None
    first.registering_since -= 3600  # an hour ago: far longer than the rate predicts
    expected = SEND_SHARE * 400 + (1 - SEND_SHARE) * 400 * ESTIMATE_CAP
    assert percent_done(progress) == round(100 * expected / total, 1)
    registered(progress, first)
    assert percent_done(progress) == 100 * 400 / total
    # What it learnt: the next image is estimated at the rate this one was registered.
    assert progress.rate == pytest.approx(400 / 3600, rel=0.01)
    # Two images in flight count each its own part.
    second = take_off(progress, "b", 600)
    second.sent = 300
    assert progress.image == "a"
    assert progress.bytes_done == 700
    assert percent_done(progress) == round(100 * (400 + SEND_SHARE * 300) / total, 1)
    land(progress, first, loaded=True)
    assert progress.image == "b"
    assert progress.images == ["a"]
    assert percent_done(progress) == round(100 * (400 + SEND_SHARE * 300) / total, 1)
