"""The image archive read by its parts: a `docker save` tar inside AES-CBC, indexed
without decrypting the bodies, and cut into one OCI-layout tar per image.

CBC decrypts any block given the ciphertext block before it, so a byte range of the
plaintext costs its own blocks and one more. Walking the tar header -> size -> next header
decrypts 512 bytes a member: the index of a stack of images is a small fraction of it.
From the index, `manifest.json` (the common ground of Docker's legacy and OCI layouts)
names each image's config and layers, and each image can go to the engine as its own
small tar holding only the layers the engine lacks (../shared/research/field-tests.md:
the OCI layout, with a one-image `manifest.json`, is the shape Docker 20.10, Docker 26 and
Podman all load thin).

Blocking file I/O and decryption: callers run these off the event loop. Reads use
pread, so several images may stream from one open archive at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from loader.crypto import BLOCK, IV_SIZE, block_decryptor, plaintext_size
from loader.errors import DecryptionFailed

# What the tar reads in, and what a piece of a member's stream is.
_RECORD = tarfile.BLOCKSIZE
PIECE = 1024 * 1024
_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
# A fixed time for the tars made here: the same image gives the same bytes.
_MTIME = 0


class ArchiveDamaged(DecryptionFailed):
    """The archive decrypts, but what it holds is not a `docker save` tar."""


@dataclass(frozen=True)
class Member:
    """A file in the archive: its data's offset in the plaintext, and its size."""

    name: str
    offset: int
    size: int


class EncryptedArchive:
    """Random access to the plaintext of `IV || AES-256-CBC(PKCS7(tar))` on disk.

    Opening checks the padding of the last block: a wrong key or a truncated archive is
    refused before anything else is read.
    """

    def __init__(self, file: BinaryIO, key: bytes) -> None:
        self._file = file
        self._fd = file.fileno()
        self._key = key
        blob_size = os.fstat(self._fd).st_size
        if blob_size < IV_SIZE + BLOCK:
            raise DecryptionFailed("the archive is too short to hold anything")
        self.size = plaintext_size(key, blob_size, os.pread(self._fd, 2 * BLOCK, blob_size - 32))
        # Ciphertext bytes decrypted so far, for what the index costs.
        self.decrypted = 0

    @classmethod
    def open(cls, path: Path, key: bytes) -> EncryptedArchive:
        """The archive at `path`; OSError if it cannot be read, DecryptionFailed if the key
        is wrong or the archive cut short."""
        file = path.open("rb")
        try:
            return cls(file, key)
        except BaseException:
            file.close()
            raise

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> EncryptedArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, offset: int, size: int) -> bytes:
        """The plaintext from `offset`, at most `size` bytes (fewer at the end)."""
        return b"".join(self.chunks(offset, size, piece=max(size, BLOCK)))

    def chunks(self, offset: int, size: int, piece: int = PIECE) -> Iterator[bytes]:
        """The plaintext from `offset`, at most `size` bytes, in pieces of about `piece`."""
        end = min(offset + size, self.size)
        if offset >= end:
            return
        start = offset - offset % BLOCK
        # The ciphertext block before `start` is its IV: the archive's own IV for block 0.
        previous = os.pread(self._fd, BLOCK, start)
        decryptor = block_decryptor(self._key, previous)
        position = start  # plaintext offset of the next block to decrypt
        skip = offset - start
        step = max(BLOCK, piece - piece % BLOCK)
        while position < end:
            count = min(step, end - position + (-(end - position) % BLOCK))
            cipher = os.pread(self._fd, count, IV_SIZE + position)
            if len(cipher) != count:
                raise DecryptionFailed("the archive changed or was cut while it was read")
            self.decrypted += count
            plain = decryptor.update(cipher)
            keep = plain[skip : min(count, end - position)]
            skip = 0
            position += count
            if keep:
                yield keep


def starts_as_a_tar(archive: EncryptedArchive) -> bool:
    """Whether the plaintext opens with a tar header: with the tail's padding, what tells a
    wrong key (whose padding is valid once in about 256 tries) before anything is sent."""
    try:
        tarfile.TarInfo.frombuf(archive.read(0, _RECORD), "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


def index_members(archive: EncryptedArchive) -> dict[str, Member]:
    """Every regular file of the tar, by name, from its headers alone (ustar, GNU long
    names and pax headers, as Go's archive/tar and Python's tarfile write them)."""
    members: dict[str, Member] = {}
    offset = 0
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = archive.read(offset, _RECORD)
        if len(header) < _RECORD:
            raise ArchiveDamaged(f"the archive ends inside a tar header at byte {offset}")
        if header == bytes(_RECORD):
            return members  # the end-of-archive marker
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError:
            raise ArchiveDamaged(f"no tar header at byte {offset}: not a docker save tar") from None
        data = offset + _RECORD
        size = info.size
        if info.type == tarfile.GNUTYPE_LONGNAME:
            long_name = archive.read(data, info.size).rstrip(b"\0").decode("utf-8", "replace")
        elif info.type == tarfile.XHDTYPE:
            pax = _pax_records(archive.read(data, info.size))
        elif info.type != tarfile.XGLTYPE:
            name = pax.get("path") or long_name or info.name
            size = int(pax.get("size", size))
            if info.isreg():
                members[name.removeprefix("./")] = Member(name.removeprefix("./"), data, size)
            long_name, pax = None, {}
        offset = data + size + (-size % _RECORD)
        if offset > archive.size:
            raise ArchiveDamaged("the archive ends inside a member: it is truncated")


def _pax_records(raw: bytes) -> dict[str, str]:
    """`LENGTH KEY=VALUE\\n` records (POSIX pax extended header)."""
    records: dict[str, str] = {}
    position = 0
    while position < len(raw):
        length_text, _, _ = raw[position : position + 20].partition(b" ")
        if not length_text.isdigit() or int(length_text) <= 0:
            raise ArchiveDamaged("a pax header of the archive is malformed")
        record = raw[position : position + int(length_text)]
        key, _, value = record[len(length_text) + 1 : -1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        position += int(length_text)
    return records


@dataclass(frozen=True)
class Layer:
    member: Member
    # "sha256:<hex>" of the uncompressed layer tar: its diff ID, the name of its blob.
    digest: str


@dataclass(frozen=True)
class Image:
    """One image of the archive: its tags, its config, its layers from the base up."""

    tags: tuple[str, ...]
    config: bytes
    layers: tuple[Layer, ...]

    @property
    def id(self) -> str:
        """Docker's image ID: the SHA-256 of the config."""
        return "sha256:" + hashlib.sha256(self.config).hexdigest()

    @property
    def size(self) -> int:
        return len(self.config) + sum(layer.member.size for layer in self.layers)

    @property
    def manifest(self) -> bytes:
        """The OCI manifest the loader sends for this image: the same bytes every time."""
        return _json(
            {
                "schemaVersion": 2,
                "mediaType": _OCI_MANIFEST,
                "config": {"mediaType": _OCI_CONFIG, "digest": self.id, "size": len(self.config)},
                "layers": [
                    {"mediaType": _OCI_LAYER, "digest": layer.digest, "size": layer.member.size}
                    for layer in self.layers
                ],
            }
        )

    @property
    def ids(self) -> frozenset[str]:
        """What an engine that holds this image calls it: the config's digest (Docker's
        graphdriver store, Podman), or the digest of the manifest the loader sent, which
        names that config (Docker's containerd image store)."""
        return frozenset({self.id, "sha256:" + hashlib.sha256(self.manifest).hexdigest()})


def read_images(archive: EncryptedArchive, members: dict[str, Member]) -> list[Image]:
    """The images `manifest.json` lists, with their configs read and their layers named."""
    raw = _member_bytes(archive, members, "manifest.json", limit=16 * 1024 * 1024)
    try:
        entries = json.loads(raw)
        images = [_image(archive, members, entry) for entry in entries]
    except (ValueError, TypeError, KeyError, AttributeError):
        raise ArchiveDamaged("the archive's manifest.json is not a docker save manifest") from None
    return images


def _image(archive: EncryptedArchive, members: dict[str, Member], entry: dict[str, Any]) -> Image:
    config = _member_bytes(archive, members, entry["Config"], limit=64 * 1024 * 1024)
    diff_ids = json.loads(config)["rootfs"]["diff_ids"]
    paths = entry["Layers"]
    if len(paths) != len(diff_ids):
        raise ArchiveDamaged(
            f"{entry['Config']} names {len(diff_ids)} layers, the manifest {len(paths)}"
        )
    layers = []
    for path, diff_id in zip(paths, diff_ids, strict=True):
        if path not in members:
            raise ArchiveDamaged(f"the archive lacks {path}, a layer its manifest names")
        layers.append(Layer(members[path], diff_id))
    return Image(tuple(entry.get("RepoTags") or ()), config, tuple(layers))


def _member_bytes(
    archive: EncryptedArchive, members: dict[str, Member], name: str, limit: int
) -> bytes:
    member = members.get(name)
    if member is None:
        raise ArchiveDamaged(f"the archive has no {name}: not a docker save tar")
    if member.size > limit:
        raise ArchiveDamaged(f"{name} in the archive is {member.size} bytes: too big to be one")
    return archive.read(member.offset, member.size)


def layers_present(image: Image, engine_layers: Iterable[tuple[str, ...]]) -> set[str]:
    """The digests of `image`'s layers that an engine holding images with `engine_layers`
    (each a base-up list of diff IDs) has already: a layer counts only with every layer
    under it the same, as the engine keys layers by their whole chain."""
    chains = {layers[:depth] for layers in engine_layers for depth in range(1, len(layers) + 1)}
    digests = tuple(layer.digest for layer in image.layers)
    return {digests[depth - 1] for depth in range(1, len(digests) + 1) if digests[:depth] in chains}


def image_tar(
    archive: EncryptedArchive,
    image: Image,
    present: Iterable[str] = (),
    piece: int = PIECE,
    *,
    podman: bool = False,
) -> Iterator[bytes]:
    """`image` as a tar in the OCI image layout, with a one-image `manifest.json` for
    engines that read that, decrypted on the fly; the files of the layers whose digests
    are in `present` (the engine has them) are left out.

    For Podman, an image sent whole goes without the OCI files (`oci-layout`,
    `index.json`): Podman then reads it as a docker-archive in place, where it unpacks an
    OCI archive into its temporary folder first (bench/ row 1d: 5.3 s instead of 6.6-11
    for a 522 MB image). Thin tars must stay OCI: Podman refuses a docker-archive that
    lacks a layer. Either way Podman names the image as `podman load` does (localhost/).
    """
    skip = set(present)
    oci = not podman or any(layer.digest in skip for layer in image.layers)
    config_digest = image.id  # the config's own digest
    manifest = image.manifest
    manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    index = {
        "schemaVersion": 2,
        "mediaType": _OCI_INDEX,
        "manifests": [
            {
                "mediaType": _OCI_MANIFEST,
                "digest": manifest_digest,
                "size": len(manifest),
                "annotations": _ref_annotations(image.tags, "localhost" if podman else "docker.io"),
            }
        ],
    }
    docker_manifest = [
        {
            "Config": _blob(config_digest),
            "RepoTags": list(image.tags),
            "Layers": [_blob(layer.digest) for layer in image.layers],
        }
    ]
    files = [
        ("manifest.json", _json(docker_manifest)),
        (_blob(config_digest), image.config),
    ]
    if oci:
        layout = b'{"imageLayoutVersion":"1.0.0"}'
        files = [("oci-layout", layout), ("index.json", _json(index)), *files]
        files.append((_blob(manifest_digest), manifest))
    for name, data in files:
        yield _file_header(name, len(data)) + _padded(data)
    written: set[str] = set()
    for layer in image.layers:
        if layer.digest in skip or layer.digest in written:
            continue
        written.add(layer.digest)
        member = layer.member
        yield _file_header(_blob(layer.digest), member.size)
        yield from archive.chunks(member.offset, member.size, piece)
        if member.size % _RECORD:
            yield bytes(-member.size % _RECORD)
    yield bytes(2 * _RECORD)


def _ref_annotations(tags: tuple[str, ...], domain: str) -> dict[str, str]:
    if not tags:
        return {}
    name = tags[0]
    # Docker's containerd image store looks an image up by its full name: under a short
    # one, it loads and lists it, but inspect cannot find it. Podman names the image so.
    return {
        "io.containerd.image.name": _full_name(name, domain),
        "org.opencontainers.image.ref.name": name,
    }


def _full_name(tag: str, domain: str = "docker.io") -> str:
    """`tag` as the engine normalises it. Docker: "azaion/x:1" is "docker.io/azaion/x:1",
    "x:1" is "docker.io/library/x:1". Podman's `load`: "localhost/azaion/x:1". A name that
    starts with a registry stays as it is."""
    first, slash, _ = tag.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        return tag
    if domain != "docker.io":
        return f"{domain}/{tag}"
    return f"docker.io/{tag}" if slash else f"docker.io/library/{tag}"


def _blob(digest: str) -> str:
    algorithm, _, hexdigest = digest.partition(":")
    return f"blobs/{algorithm}/{hexdigest}"


def _json(data: object) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def _file_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = _MTIME
    return info.tobuf(format=tarfile.PAX_FORMAT)


def _padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % _RECORD)
