"""The test harness's private dockerd and image archive (tests/dockerd.py)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from loader.crypto import encrypted_size, key_from_fragment
from loader.errors import DecryptionFailed
from tests.blobs import decrypt, decrypt_chunks
from tests.conftest import skip_or_fail
from tests.dockerd import (
    PAYLOAD_FILE_MAX,
    STACK_NAMES,
    DockerdError,
    MiB,
    PrivateDockerd,
    build_stack_images,
    image_ids,
    present_images,
    remove_images,
    rootfs_chunks,
    write_archive,
    write_plain_tar,
)

VERSION = "harness-test"
FRAGMENT = b"harness-fragment-\x00\xff"


class IterReader(io.RawIOBase):
    """A read-only file over an iterator of bytes, for tarfile's stream mode."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._buffer = b""

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        while not self._buffer:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._buffer = chunk
        n = min(len(target), len(self._buffer))
        target[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n


def file_chunks(path: Path, size: int = MiB) -> Iterator[bytes]:
    with open(path, "rb") as f:
        yield from iter(lambda: f.read(size), b"")


@pytest.fixture
def fresh_dockerd() -> Iterator[PrivateDockerd]:
    """A daemon of the test's own, not started, stopped and removed afterwards."""
    reason = PrivateDockerd.available()
    if reason:
        skip_or_fail(reason)
    daemon = PrivateDockerd()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def harness_images(private_dockerd: PrivateDockerd) -> Iterator[list[str]]:
    tags = build_stack_images(private_dockerd, VERSION, payload_bytes=7 * 100_000)
    yield tags
    remove_images(private_dockerd, tags)


def test_rootfs_is_a_tar_with_the_payload_in_files_of_at_most_64_mib() -> None:
    payload = PAYLOAD_FILE_MAX + 1000
    with tarfile.open(
        fileobj=IterReader(rootfs_chunks("azaion/flights", "v1", payload)), mode="r|"
    ) as tar:
        members = {m.name: m.size for m in tar}
    assert members["etc/azaion/service"] == len(b"azaion/flights\n")
    blobs = sorted(size for name, size in members.items() if name.endswith(".bin"))
    assert blobs == [1000, PAYLOAD_FILE_MAX]


def test_rootfs_payload_differs_between_images_and_repeats_with_the_seed() -> None:
    def tar(name: str, seed: int) -> bytes:
        return b"".join(rootfs_chunks(name, "v1", 4096, seed))

    assert tar("azaion/flights", 1) == tar("azaion/flights", 1)
    assert tar("azaion/flights", 1) != tar("azaion/flights", 2)
    assert tar("azaion/flights", 1)[-5120:] != tar("azaion/autopilot", 1)[-5120:]


@pytest.mark.docker
def test_private_dockerd_answers_on_its_own_socket(
    private_dockerd: PrivateDockerd, docker_api: Any
) -> None:
    assert docker_api.ping()
    assert private_dockerd.host == f"unix://{private_dockerd.socket}"
    assert len(str(private_dockerd.socket)) <= 107
    assert docker_api.info()["DockerRootDir"] == str(private_dockerd.data_root)
    assert private_dockerd.pid in private_dockerd.processes()


@pytest.mark.docker
def test_seven_images_with_distinct_ids_and_layers(
    harness_images: list[str], docker_api: Any
) -> None:
    assert harness_images == [f"{name}:{VERSION}" for name in STACK_NAMES]
    assert present_images(docker_api, harness_images) == harness_images
    ids = image_ids(docker_api, harness_images)
    assert len(set(ids.values())) == 7
    layers = [tuple(docker_api.inspect_image(t)["RootFS"]["Layers"]) for t in harness_images]
    assert len(set(layers)) == 7


@pytest.mark.docker
def test_archive_decrypts_to_the_recorded_docker_save_tar(
    private_dockerd: PrivateDockerd, harness_images: list[str], tmp_path: Path
) -> None:
    path = tmp_path / "images.enc"
    info = write_archive(private_dockerd, harness_images, FRAGMENT, path, chunk=64 * 1024)
    assert info.path == path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images.enc"]
    assert info.size == encrypted_size(info.plaintext_size)

    plaintext = b"".join(decrypt_chunks(key_from_fragment(FRAGMENT), file_chunks(path)))
    assert len(plaintext) == info.plaintext_size
    assert hashlib.sha256(plaintext).hexdigest() == info.plaintext_sha256
    with tarfile.open(fileobj=io.BytesIO(plaintext)) as tar:
        manifest_file = tar.extractfile("manifest.json")
        assert manifest_file is not None
        manifest = json.load(manifest_file)
    assert sorted(tag for image in manifest for tag in image["RepoTags"]) == sorted(harness_images)

    with pytest.raises(DecryptionFailed):
        b"".join(decrypt_chunks(key_from_fragment(b"wrong"), file_chunks(path)))


@pytest.mark.docker
def test_plain_tar_and_plaintext_copy(
    private_dockerd: PrivateDockerd, harness_images: list[str], tmp_path: Path
) -> None:
    archive = write_archive(private_dockerd, harness_images, FRAGMENT, tmp_path / "a.enc")
    plain = write_plain_tar(private_dockerd, harness_images, tmp_path / "a.tar")
    # Two saves differ in manifest.json's bytes (not its content), so only the sizes match.
    assert plain.size == plain.plaintext_size == archive.plaintext_size
    assert hashlib.sha256(plain.path.read_bytes()).hexdigest() == plain.plaintext_sha256

    both = write_archive(
        private_dockerd, harness_images, FRAGMENT, tmp_path / "b.enc", plain=tmp_path / "b.tar"
    )
    copy = (tmp_path / "b.tar").read_bytes()
    assert hashlib.sha256(copy).hexdigest() == both.plaintext_sha256
    assert decrypt(key_from_fragment(FRAGMENT), both.path.read_bytes()) == copy
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.enc", "a.tar", "b.enc", "b.tar"]


@pytest.mark.docker
def test_remove_images_is_idempotent(private_dockerd: PrivateDockerd) -> None:
    tags = build_stack_images(private_dockerd, "removal", names=STACK_NAMES[:2])
    assert present_images(private_dockerd, tags) == tags
    remove_images(private_dockerd, tags)
    remove_images(private_dockerd, tags)
    assert present_images(private_dockerd, tags) == []


@pytest.mark.docker
def test_stop_leaves_no_process_mount_or_file(
    fresh_dockerd: PrivateDockerd, private_dockerd: PrivateDockerd
) -> None:
    fresh_dockerd.start()
    assert len(fresh_dockerd.processes()) == 2  # dockerd and its own containerd
    assert fresh_dockerd.mounts()
    fresh_dockerd.stop()
    assert not fresh_dockerd.running
    assert fresh_dockerd.processes() == []
    assert fresh_dockerd.mounts() == []
    assert not fresh_dockerd.root.exists()
    assert private_dockerd.running


@pytest.mark.docker
def test_kill_then_start_keeps_the_data_root(
    fresh_dockerd: PrivateDockerd, private_dockerd: PrivateDockerd
) -> None:
    fresh_dockerd.start()
    tags = build_stack_images(fresh_dockerd, "crash", names=STACK_NAMES[:1])
    assert present_images(private_dockerd, tags) == []

    fresh_dockerd.kill()
    assert not fresh_dockerd.running
    assert fresh_dockerd.processes() == []
    fresh_dockerd.start()
    assert present_images(fresh_dockerd, tags) == tags

    fresh_dockerd.kill()
    assert fresh_dockerd.mounts()
    fresh_dockerd.stop()
    assert fresh_dockerd.processes() == []
    assert fresh_dockerd.mounts() == []
    assert not fresh_dockerd.root.exists()


@pytest.mark.docker
def test_a_daemon_that_exits_at_once_is_an_error_with_its_log(
    fresh_dockerd: PrivateDockerd,
) -> None:
    fresh_dockerd.binary = "/bin/false"
    with pytest.raises(DockerdError, match="exited with 1"):
        fresh_dockerd.start()
    assert not fresh_dockerd.running


@pytest.mark.docker
def test_a_failed_save_leaves_no_file(private_dockerd: PrivateDockerd, tmp_path: Path) -> None:
    with pytest.raises(docker.errors.NotFound):
        write_archive(private_dockerd, ["azaion/absent:none"], FRAGMENT, tmp_path / "x.enc")
    assert list(tmp_path.iterdir()) == []
