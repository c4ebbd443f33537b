"""The image archive read by its parts (loader/archive.py): an index from the tar headers
alone, byte ranges decrypted on their own, and one OCI-layout tar per image that the
engine loads, thin where it has the layers already."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from loader.archive import (
    ArchiveDamaged,
    EncryptedArchive,
    Image,
    Layer,
    Member,
    image_tar,
    index_members,
    layers_present,
    read_images,
    starts_as_a_tar,
)
from loader.crypto import key_from_fragment
from loader.errors import DecryptionFailed, DockerFailed
from loader.images import Docker
from tests.blobs import encrypt
from tests.conftest import ARCHIVE_FRAGMENT
from tests.dockerd import (
    ArchiveInfo,
    MiB,
    PrivateDockerd,
    layer_tar,
    legacy_save,
    remove_images,
    tar_of,
)

KEY = key_from_fragment(ARCHIVE_FRAGMENT)


def encrypted_file(tmp_path: Path, plaintext: bytes, key: bytes = KEY) -> Path:
    path = tmp_path / "images.enc"
    path.write_bytes(encrypt(key, plaintext))
    return path


@pytest.fixture
def opened() -> Iterator[Any]:
    """`opened(path, key=KEY)`: the archive, closed at the end of the test."""
    archives: list[EncryptedArchive] = []

    def open_archive(path: Path, key: bytes = KEY) -> EncryptedArchive:
        archives.append(EncryptedArchive.open(path, key))
        return archives[-1]

    yield open_archive
    for archive in archives:
        archive.close()


@pytest.mark.parametrize("form", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_the_index_names_every_file_where_tarfile_finds_it(
    tmp_path: Path, form: int, opened: Any
) -> None:
    files = {
        "manifest.json": b"[]",
        "a" * 64 + "/layer.tar": os.urandom(5000),
        "blobs/sha256/" + "b" * 64: os.urandom(1),
        "empty": b"",
        "exactly-one-record": os.urandom(512),
    }
    if form != tarfile.USTAR_FORMAT:  # names beyond ustar's 100 + 155 characters
        files["deep/" * 40 + "file"] = os.urandom(700)
    if form == tarfile.PAX_FORMAT:
        files["naïve-ünicode"] = b"pax only"
    plaintext = tar_of(files, form)
    archive = opened(encrypted_file(tmp_path, plaintext))
    members = index_members(archive)
    assert set(members) == set(files)
    for name, data in files.items():
        member = members[name]
        assert (member.size, plaintext[member.offset : member.offset + member.size]) == (
            len(data),
            data,
        )
        assert archive.read(member.offset, member.size) == data


def test_the_index_decrypts_headers_not_bodies(tmp_path: Path, opened: Any) -> None:
    files = {f"layer-{i}.tar": os.urandom(4 * MiB) for i in range(8)}
    path = encrypted_file(tmp_path, tar_of(files))
    archive = opened(path)
    assert len(index_members(archive)) == 8
    # A record a member, and the blocks around: about 10 KB of a 32 MB archive.
    assert archive.decrypted < 16 * 1024, archive.decrypted
    assert archive.decrypted < path.stat().st_size / 1000


RANGE_PLAINTEXT = os.urandom(65_537)


@pytest.fixture(scope="module")
def range_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return encrypted_file(tmp_path_factory.mktemp("range"), RANGE_PLAINTEXT)


@hsettings(max_examples=200, deadline=None)
@given(offset=st.integers(0, 70_000), size=st.integers(0, 70_000), piece=st.integers(1, 9000))
def test_any_range_decrypts_on_its_own(
    range_file: Path, offset: int, size: int, piece: int
) -> None:
    with EncryptedArchive.open(range_file, KEY) as archive:
        chunks = list(archive.chunks(offset, size, piece))
    assert b"".join(chunks) == RANGE_PLAINTEXT[offset : offset + size]
    assert all(chunks)


def refused(path: Path, key: bytes) -> bool:
    """Whether `key` is refused by the checks made before anything is sent: the tail's
    padding, then the first tar header."""
    try:
        archive = EncryptedArchive.open(path, key)
    except DecryptionFailed:
        return True
    with archive:
        return not starts_as_a_tar(archive)


def test_a_wrong_key_or_a_cut_archive_is_refused_at_once(tmp_path: Path) -> None:
    path = encrypted_file(tmp_path, tar_of({"manifest.json": b"[]"}))
    assert not refused(path, KEY)
    # The tail's padding alone is valid for about one wrong key in 256: 2,000 keys hold
    # about 8 such, and the first header refuses those too.
    wrong = [key_from_fragment(b"wrong-%d" % number) for number in range(2000)]
    assert all(refused(path, key) for key in wrong)
    whole = path.read_bytes()
    for cut in (16, 100, len(whole) - 20):
        path.write_bytes(whole[:-cut])
        assert refused(path, KEY), cut


def test_a_blob_that_is_not_a_tar_is_damaged(tmp_path: Path, opened: Any) -> None:
    archive = opened(encrypted_file(tmp_path, os.urandom(3000)))
    with pytest.raises(ArchiveDamaged, match="no tar header at byte 0"):
        index_members(archive)
    plaintext = tar_of({"big": os.urandom(10_000)})
    archive = opened(encrypted_file(tmp_path, plaintext[:4096]))  # cut inside "big"
    with pytest.raises(ArchiveDamaged, match="truncated"):
        index_members(archive)


# ---- images, and the engine ----------------------------------------------------------


@pytest.fixture
def stack(tmp_path: Path, private_dockerd: PrivateDockerd) -> Iterator[tuple[Path, list[str]]]:
    """A base layer shared by three images, each with a layer of its own."""
    base = layer_tar("base", 2 * MiB)
    tags = [f"azl-archive-test/child-{i}:1" for i in range(3)]
    plaintext = legacy_save({tag: [base, layer_tar(tag, 256 * 1024)] for tag in tags})
    remove_images(private_dockerd, tags)
    yield encrypted_file(tmp_path, plaintext), tags
    remove_images(private_dockerd, tags)


def test_each_image_loads_alone_and_thin_with_its_id(
    stack: tuple[Path, list[str]], private_dockerd: PrivateDockerd, opened: Any
) -> None:
    path, tags = stack
    archive = opened(path)
    images = read_images(archive, index_members(archive))
    assert [image.tags for image in images] == [(tag,) for tag in tags]
    docker = Docker(private_dockerd.host)
    try:
        first, *others = images
        assert (
            layers_present(first, [layers.layers for layers in docker.inspect(tags).values()])
            == set()
        )
        whole = counted_load(docker, image_tar(archive, first))
        assert whole > 2 * MiB
        for image in others:
            engine = docker.inspect(tags)
            present = layers_present(image, [each.layers for each in engine.values()])
            # The base is in the engine now: the tar holds only the image's own layer.
            assert present == {image.layers[0].digest}
            sent = counted_load(docker, image_tar(archive, image, present))
            assert sent < whole - 2 * MiB + 64 * 1024, (sent, whole)
        engine = docker.inspect(tags)
        assert {tag: each.id for tag, each in engine.items()} == {
            image.tags[0]: image.id for image in images
        }
        assert all(
            engine[image.tags[0]].layers == tuple(layer.digest for layer in image.layers)
            for image in images
        )
    finally:
        docker.close()


def counted_load(docker: Docker, chunks: Iterator[bytes]) -> int:
    """Load a tar through the loader's own Docker client; returns the bytes sent."""
    sent = 0

    def counted() -> Iterator[bytes]:
        nonlocal sent
        for chunk in chunks:
            sent += len(chunk)
            yield chunk

    docker.load(counted())
    return sent


def test_a_layer_counts_as_present_only_over_the_same_base() -> None:
    def image(*digests: str) -> Image:
        return Image((), b"{}", tuple(Layer(Member(d, 0, 1), d) for d in digests))

    engine = [("base", "a"), ("other-base", "b")]
    assert layers_present(image("base", "a", "c"), engine) == {"base", "a"}
    assert layers_present(image("base", "b"), engine) == {"base"}  # b sits on another base
    assert layers_present(image("b"), engine) == set()
    assert layers_present(image("other-base", "b", "a"), engine) == {"other-base", "b"}


@pytest.mark.parametrize(
    ("tag", "full"),
    [
        ("azaion/annotations:latest", "docker.io/azaion/annotations:latest"),
        ("busybox:1", "docker.io/library/busybox:1"),
        ("registry.azaion.local/azaion/x:2", "registry.azaion.local/azaion/x:2"),
        ("localhost:5000/x:2", "localhost:5000/x:2"),
        ("localhost/x:2", "localhost/x:2"),
    ],
)
def test_the_oci_index_names_the_image_in_full(
    tmp_path: Path, opened: Any, tag: str, full: str
) -> None:
    # Docker 26's containerd store takes the name as written: a short one loads, but
    # inspect (which looks up the full name) cannot find the image.
    archive = opened(encrypted_file(tmp_path, legacy_save({tag: [layer_tar("x", 1024)]})))
    image = read_images(archive, index_members(archive))[0]
    with tarfile.open(fileobj=io.BytesIO(b"".join(image_tar(archive, image)))) as tar:
        index = tar.extractfile("index.json")
        assert index is not None
        annotations = json.loads(index.read())["manifests"][0]["annotations"]
    assert annotations == {
        "io.containerd.image.name": full,
        "org.opencontainers.image.ref.name": tag,
    }


def test_a_thin_tar_without_the_base_in_the_engine_is_refused(
    stack: tuple[Path, list[str]], private_dockerd: PrivateDockerd, opened: Any
) -> None:
    path, _ = stack
    archive = opened(path)
    image: Image = read_images(archive, index_members(archive))[0]
    docker = Docker(private_dockerd.host)
    try:
        with pytest.raises(DockerFailed, match="Docker refused the images"):
            counted_load(docker, image_tar(archive, image, [image.layers[0].digest]))
    finally:
        docker.close()


def test_a_real_docker_save_archive(
    image_archive: ArchiveInfo, private_dockerd: PrivateDockerd, opened: Any
) -> None:
    archive = opened(image_archive.path)
    members = index_members(archive)
    images = read_images(archive, members)
    assert len(images) == 7
    tags = [image.tags[0] for image in images]
    remove_images(private_dockerd, tags)
    docker = Docker(private_dockerd.host)
    try:
        for image in images:
            counted_load(docker, image_tar(archive, image))
        assert {tag: each.id for tag, each in docker.inspect(tags).items()} == {
            image.tags[0]: image.id for image in images
        }
    finally:
        docker.close()
        remove_images(private_dockerd, tags)


def test_for_podman_a_whole_image_goes_as_a_docker_archive_and_a_thin_one_as_oci(
    tmp_path: Path, opened: Any
) -> None:
    """Podman reads a docker-archive in place but unpacks an OCI archive first; it refuses
    a docker-archive that lacks a layer. Both shapes name the image as `podman load` does."""
    base, own = layer_tar("base", 4096), layer_tar("own", 2048)
    tag = "azaion/flights:latest"
    archive = opened(encrypted_file(tmp_path, legacy_save({tag: [base, own]})))
    image = read_images(archive, index_members(archive))[0]

    def names(tar: bytes) -> list[str]:
        with tarfile.open(fileobj=io.BytesIO(tar)) as opened_tar:
            return opened_tar.getnames()

    whole = b"".join(image_tar(archive, image, podman=True))
    assert "index.json" not in names(whole)
    assert "oci-layout" not in names(whole)
    assert "manifest.json" in names(whole)
    assert all(_blob(layer.digest) in names(whole) for layer in image.layers)

    thin = b"".join(image_tar(archive, image, [image.layers[0].digest], podman=True))
    assert {"oci-layout", "index.json", "manifest.json"} <= set(names(thin))
    assert _blob(image.layers[0].digest) not in names(thin)
    with tarfile.open(fileobj=io.BytesIO(thin)) as tar:
        index = tar.extractfile("index.json")
        assert index is not None
        annotations = json.loads(index.read())["manifests"][0]["annotations"]
    assert annotations["io.containerd.image.name"] == f"localhost/{tag}"
    # Docker gets the OCI layout either way.
    assert "index.json" in names(b"".join(image_tar(archive, image)))


def _blob(digest: str) -> str:
    return "blobs/sha256/" + digest.removeprefix("sha256:")
