"""/unlock into Docker 26.1 (Debian 13's docker.io), with its default image store and with
the containerd image store: image by image, each ID checked, resumed after a failure and
after Docker was killed, and an image the containerd store took thin but left incomplete
sent again whole. Docker 26 runs in a booted Debian 13 (tests/docker26.py); the loader runs
here and reaches it through a socket in a bound folder."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from loader.archive import Image
from loader.crypto import key_from_fragment
from loader.images import Docker
from loader.settings import Settings
from tests.blobs import encrypt
from tests.conftest import (
    ARCHIVE_FRAGMENT,
    EMAIL,
    PASSWORD,
    LocalApp,
    archive_images,
    skip_or_fail,
    wait_for,
)
from tests.docker26 import BootedDocker26, Docker26Error
from tests.dockerd import (
    STACK_NAMES,
    MiB,
    layer_tar,
    legacy_save,
    oci_save,
    stack_tags,
    tar_of,
)

STACK = stack_tags("latest", STACK_NAMES)
GRAPHDRIVER, CONTAINERD = "graphdriver", "containerd"
Save = Callable[[dict[str, list[bytes]]], bytes]


@pytest.fixture(scope="module")
def docker26() -> Iterator[BootedDocker26]:
    reason = BootedDocker26.available()
    if reason:
        skip_or_fail(reason)
    booted = BootedDocker26()
    try:
        booted.start()
    except Docker26Error as exc:
        booted.stop()
        skip_or_fail(f"Docker 26 did not start in Debian 13: {exc}")
    yield booted
    booted.stop()


# Module-scoped, so that pytest runs each store's tests together: one restart per store.
@pytest.fixture(scope="module", params=[GRAPHDRIVER, CONTAINERD])
def store(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def _engine(docker26: BootedDocker26, containerd: bool) -> Iterator[Docker]:
    """The loader's own client of Docker 26 in the store asked for; the stack removed
    before and after."""
    docker26.use_store(containerd)
    client = Docker(docker26.host)
    client.remove(list(client.inspect(STACK)))
    yield client
    client.remove(list(client.inspect(STACK)))
    client.close()


@pytest.fixture
def engine(docker26: BootedDocker26, store: str) -> Iterator[Docker]:
    yield from _engine(docker26, store == CONTAINERD)


@pytest.fixture
def containerd_engine(docker26: BootedDocker26) -> Iterator[Docker]:
    yield from _engine(docker26, True)


@pytest.fixture
def start(
    make_local_app: Callable[[Settings], Any],
    with_settings: Callable[..., Settings],
    docker26: BootedDocker26,
) -> Callable[..., Any]:
    async def start(**changes: Any) -> LocalApp:
        settings = with_settings(**{"docker_host": docker26.host, **changes})
        app: LocalApp = await make_local_app(settings)
        return app

    return start


def stack_layers(own: int = 256 * 1024) -> dict[str, list[bytes]]:
    """The stack on a shared base of 2 MiB, each image with a layer of its own: new random
    bytes each time, so no layer of an earlier test is in the engine."""
    base = layer_tar("base", 2 * MiB)
    return {tag: [base, layer_tar(tag, own)] for tag in STACK}


def write_stack(
    path: Path, layers: dict[str, list[bytes]], save: Save = legacy_save, damaged: str | None = None
) -> Path:
    """The stack saved by `save`, encrypted as an archive; `damaged`'s own layer has a byte
    flipped."""
    plaintext = bytearray(save(layers))
    if damaged is not None:
        own = layers[damaged][1]
        plaintext[plaintext.find(own) + len(own) // 2] ^= 0x01
    path.write_bytes(encrypt(key_from_fragment(ARCHIVE_FRAGMENT), bytes(plaintext)))
    return path


def expected_id(image: Image, containerd: bool) -> str:
    """What Docker 26 calls the image: the config's digest with its graphdriver store, the
    digest of the manifest the loader sent with the containerd store."""
    if containerd:
        return "sha256:" + hashlib.sha256(image.manifest).hexdigest()
    return image.id


def held(engine: Docker) -> dict[str, str]:
    """Each stack tag Docker has, with its image's ID."""
    return {tag: image.id for tag, image in engine.inspect(STACK).items()}


def listed_tags(docker26: BootedDocker26) -> set[str]:
    """The tags of GET /images/json: the containerd store leaves an incomplete image out."""
    api = docker.APIClient(base_url=docker26.host, version="auto", timeout=30)
    try:
        return {tag for image in api.images() for tag in image.get("RepoTags") or ()}
    finally:
        api.close()


def whole_size(images: dict[str, Image], base: bytes) -> int:
    """The bytes of the stack with its shared base counted once."""
    return sum(image.size for image in images.values()) - (len(images) - 1) * len(base)


async def post_unlock(app: LocalApp) -> None:
    async with app.session.post(
        app.url("/unlock"), json={"email": EMAIL, "password": PASSWORD}
    ) as resp:
        assert resp.status == 200, await resp.text()


async def unlock_status(app: LocalApp) -> dict[str, Any]:
    async with app.session.get(app.url("/unlock/status")) as resp:
        status: dict[str, Any] = await resp.json()
    return status


async def settled(app: LocalApp) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        status = await unlock_status(app)
        return status if status["state"] in ("ready", "error") else None

    result: dict[str, Any] = await wait_for(done, 120, "the unlock to settle")
    return result


async def unlock(app: LocalApp) -> dict[str, Any]:
    await post_unlock(app)
    return await settled(app)


@pytest.mark.parametrize("save", [legacy_save, oci_save], ids=["legacy-layout", "oci-layout"])
async def test_the_stack_loads_into_docker_26_with_the_archive_ids(
    start: Callable[..., Any],
    engine: Docker,
    docker26: BootedDocker26,
    store: str,
    save: Save,
    tmp_path: Path,
) -> None:
    layers = stack_layers()
    archive = write_stack(tmp_path / "images.enc", layers, save)
    final = await unlock(await start(images_path=archive))
    assert final["state"] == "ready", final
    images = archive_images(archive)
    containerd = store == CONTAINERD
    assert held(engine) == {tag: expected_id(images[tag], containerd) for tag in STACK}
    assert all(engine_id in images[tag].ids for tag, engine_id in held(engine).items())
    assert listed_tags(docker26) >= set(STACK)
    assert set(held(engine).values()) <= engine.listed()
    # Thin: the shared base went once.
    assert final["bytesTotal"] == whole_size(images, layers[STACK[0]][0]), final


# The last one too: the containerd store would keep every tag then, one of them incomplete.
@pytest.mark.parametrize("bad", [3, len(STACK) - 1], ids=["fourth", "last"])
async def test_a_damaged_image_keeps_the_images_before_it_and_the_good_archive_resumes(
    start: Callable[..., Any],
    engine: Docker,
    docker26: BootedDocker26,
    store: str,
    bad: int,
    tmp_path: Path,
) -> None:
    layers = stack_layers()
    damaged = write_stack(tmp_path / "damaged.enc", layers, damaged=STACK[bad])
    failed = await unlock(await start(images_path=damaged))
    assert failed["state"] == "error", failed
    assert f"(loading {STACK[bad]})" in failed["error"], failed
    assert failed["error"].startswith("Docker refused"), failed
    good = write_stack(tmp_path / "good.enc", layers)
    images = archive_images(good)
    containerd = store == CONTAINERD
    kept = held(engine)
    listed = engine.listed()
    whole = {tag: engine_id for tag, engine_id in kept.items() if engine_id in listed}
    # Two go at a time: images started beside the refused one may be in too.
    assert set(STACK[:bad]) <= set(whole), sorted(whole)
    assert STACK[bad] not in kept, sorted(kept)
    assert whole == {tag: expected_id(images[tag], containerd) for tag in whole}
    # The containerd store keeps the refused image under its tag, incomplete (left out of
    # its list): the loader removes it, so that every stack tag names a whole image with
    # the archive's ID.
    assert set(kept) == set(whole)

    final = await unlock(await start(images_path=good))
    assert final["state"] == "ready", final
    assert held(engine) == {tag: expected_id(images[tag], containerd) for tag in STACK}
    assert listed_tags(docker26) >= set(STACK)
    # Only the missing images went (the refused one among them), without the base.
    base = len(layers[STACK[0]][0])
    missing = [tag for tag in STACK if tag not in whole]
    assert final["bytesTotal"] == sum(images[tag].size - base for tag in missing), final


async def test_docker_killed_mid_stack_then_back_ends_ready_with_the_archive_ids(
    start: Callable[..., Any],
    engine: Docker,
    docker26: BootedDocker26,
    store: str,
    tmp_path: Path,
) -> None:
    # Own layers big enough that the five images after the second take a while to load.
    layers = stack_layers(own=12 * MiB)
    archive = write_stack(tmp_path / "images.enc", layers)
    app = await start(images_path=archive)
    await post_unlock(app)

    async def two_done() -> bool:
        status = await unlock_status(app)
        return status["imagesDone"] >= 2 or status["state"] in ("ready", "error")

    await wait_for(two_done, 60, "two images to be loaded")
    docker26.kill_engine()
    failed = await settled(app)
    # The kill landed in the middle of the stack.
    assert failed["state"] == "error", failed
    assert 2 <= failed["imagesDone"] < len(STACK), failed
    images = archive_images(archive)
    containerd = store == CONTAINERD

    docker26.start_engine()
    # Whatever the kill left under a stack tag, no tag holds an image other than the archive's.
    for tag, engine_id in held(engine).items():
        assert engine_id in images[tag].ids, (tag, engine_id)
    final = await unlock(app)
    assert final["state"] == "ready", final
    assert held(engine) == {tag: expected_id(images[tag], containerd) for tag in STACK}
    assert listed_tags(docker26) >= set(STACK)
    assert set(held(engine).values()) <= engine.listed()


def pulled_image(tag: str, base: bytes) -> tuple[bytes, str]:
    """An OCI-layout tar of a one-layer image as a registry pull leaves it: the layer a
    gzip blob (`...tar+gzip`, its digest that of the gzip bytes), the config's diff ID that of
    the tar inside; and the image's manifest digest."""
    compressed = gzip.compress(base, mtime=0)
    files: dict[str, bytes] = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}'}

    def blob(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        files[f"blobs/sha256/{digest}"] = data
        return f"sha256:{digest}"

    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Labels": {"pulled": tag}},
            "rootfs": {
                "type": "layers",
                "diff_ids": ["sha256:" + hashlib.sha256(base).hexdigest()],
            },
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": blob(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": blob(compressed),
                    "size": len(compressed),
                }
            ],
        }
    ).encode()
    manifest_digest = blob(manifest)
    files["index.json"] = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": manifest_digest,
                    "size": len(manifest),
                    "annotations": {
                        "io.containerd.image.name": f"docker.io/{tag}",
                        "org.opencontainers.image.ref.name": tag.rpartition(":")[2],
                    },
                }
            ],
        }
    ).encode()
    return tar_of(files), manifest_digest


async def test_the_containerd_store_holding_the_base_only_compressed_gets_the_image_whole(
    start: Callable[..., Any],
    containerd_engine: Docker,
    docker26: BootedDocker26,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """field-tests.md's trap: with the base layer in containerd's content store only as a
    gzip blob (as after a pull), a thin tar loads with "Loaded image" but leaves an image
    `docker images` hides; the loader sees that and sends the image again whole."""
    engine = containerd_engine
    layers = stack_layers()
    base = layers[STACK[0]][0]
    # An older image under the first tag, pulled: the stack's base, compressed.
    pulled, pulled_id = pulled_image(STACK[0], base)
    engine.load(iter([pulled]))
    assert held(engine) == {STACK[0]: pulled_id}
    assert pulled_id in engine.listed()

    archive = write_stack(tmp_path / "images.enc", layers)
    caplog.set_level(logging.INFO, logger="loader")
    final = await unlock(await start(images_path=archive))
    assert final["state"] == "ready", final
    images = archive_images(archive)
    assert held(engine) == {tag: expected_id(images[tag], True) for tag in STACK}
    assert listed_tags(docker26) >= set(STACK)
    assert set(held(engine).values()) <= engine.listed()
    said = [r.getMessage() for r in caplog.records if "sending it whole" in r.getMessage()]
    # The engine either takes the thin tar and leaves the image incomplete, or refuses it
    # (seen with Debian 12's Docker SDK 5.0.3): either way the image is sent again whole.
    resent = [
        tag
        for tag in STACK
        if any(
            f"took {tag} without the layers it has but left it incomplete" in line
            or f"refused {tag} without the layers it has" in line
            for line in said
        )
    ]
    # The first two images go side by side, both thin: either or both are sent again
    # whole; an image starts only when one before it is whole, so those after found the
    # base whole (unless a refusal made the rest go whole anyway).
    assert len(resent) == len(said), said
    assert resent, said
    assert set(resent) <= {STACK[0], STACK[1]}, said
    # Every image was planned thin (the engine seemed to hold the base); each one sent
    # again whole added its whole size to the work.
    thin = sum(image.size - len(base) for image in images.values())
    extra = sum(images[tag].size for tag in resent)
    assert thin + extra <= final["bytesTotal"] <= thin + extra + len(STACK) * len(base), final
