"""The model cache: big parts at MODEL_CACHE_DIR/FOLDER/NAME.big, written atomically.

Each file is the big part followed by a trailer: the SHA-256 of the small part it was
joined with, the SHA-256 of the whole blob (`small || big`) and the big part's size. So a
big part left over from an older upload of the same name is known as stale (CBC would
decrypt it without complaint), and damage on disk is caught, on any filesystem (vfat and
ramfs keep no extended attributes) and after any copy: what the checks need travels inside
the file. A file without a sound trailer is never trusted. A file appears whole or not at
all: it is written under a temporary name in the same folder, fsynced, and renamed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import secrets
import struct
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from loader.errors import InsufficientStorage, LoaderError

log = logging.getLogger(__name__)

_PARTIAL = ".part"
# magic, SHA-256 of the small part, SHA-256 of small || big, the big part's size.
_TRAILER = struct.Struct(">8s32s32sQ")
_MAGIC = b"azlcach1"


@dataclass(frozen=True)
class EntryDigests:
    """What a cache entry was joined with: the small part's SHA-256 and the blob's."""

    small: bytes
    blob: bytes


class ModelCache:
    """Blocking file operations: callers run them off the event loop."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, folder: str, name: str) -> Path:
        return self.root / folder / f"{name}.big"

    def remove_debris(self) -> int:
        """Delete partial files a crash left behind; returns how many."""
        removed = 0
        with contextlib.suppress(OSError):
            for partial in self.root.glob(f".*{_PARTIAL}"):
                with contextlib.suppress(OSError):
                    partial.unlink()
                    removed += 1
        if removed:
            log.info("removed %d partial cache files left by an earlier run", removed)
        return removed

    def open(self, folder: str, name: str) -> CacheEntry | None:
        """The entry, open for reading, with what its trailer recorded; None when there is
        none, or when its trailer is missing or unsound (then it cannot be trusted).

        One open file serves the checks and the stream: an entry removed meanwhile by
        someone else cannot vanish halfway.
        """
        try:
            file = open(self.path(folder, name), "rb")  # noqa: SIM115 - the entry owns it
        except OSError:
            return None
        entry = _with_trailer(file)
        if entry is None:
            file.close()
            log.info(
                "cached %s/%s.big has no sound record of its origin: fetching it again",
                folder,
                name,
            )
        return entry

    def begin(self) -> CacheWrite:
        """A new file under a temporary name in the cache; OSError when the cache is unusable."""
        self.root.mkdir(mode=0o750, parents=True, exist_ok=True)
        partial = self.root / f".incoming-{secrets.token_hex(8)}{_PARTIAL}"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        return CacheWrite(partial, os.fdopen(fd, "wb"))

    def commit(self, write: CacheWrite, folder: str, name: str) -> Path:
        """Make `write` the entry of FOLDER/NAME, with its trailer."""
        final = self.path(folder, name)
        try:
            final.parent.mkdir(mode=0o750, exist_ok=True)
        except OSError as exc:
            write.abort()
            raise _storage_error(exc, final) from None
        write.commit(final)
        return final

    def discard(self, folder: str, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(folder, name).unlink()

    def usage(self) -> tuple[int, int]:
        """How many entries the cache holds, and their bytes on disk (trailers included)."""
        entries = size = 0
        with contextlib.suppress(OSError):
            for folder in self.root.iterdir():
                if folder.name.startswith(".") or not folder.is_dir():
                    continue
                with contextlib.suppress(OSError):
                    for entry in folder.glob("*.big"):
                        with contextlib.suppress(OSError):
                            size += entry.stat().st_size
                            entries += 1
        return entries, size


@dataclass
class CacheEntry:
    """A cache entry open for reading: `size` bytes of big part, then the trailer."""

    file: BinaryIO
    size: int
    digests: EntryDigests


def _with_trailer(file: BinaryIO) -> CacheEntry | None:
    """The entry `file` holds, at its start; None when its trailer is missing or unsound."""
    try:
        size = os.fstat(file.fileno()).st_size - _TRAILER.size
        if size <= 0:
            return None
        file.seek(size)
        magic, small, blob, recorded_size = _TRAILER.unpack(file.read(_TRAILER.size))
        file.seek(0)
    except (OSError, struct.error):
        return None
    if magic != _MAGIC or recorded_size != size:
        return None
    return CacheEntry(file, size, EntryDigests(small, blob))


class CacheWrite:
    """A big part being written: `commit` renames it into place whole, `abort` leaves nothing.

    `join(small)` comes first: the entry records the small part, and `blob_digest` is
    that of `small || big` as far as written.
    """

    def __init__(self, partial: Path, file: BinaryIO) -> None:
        self.partial = partial
        self.file = file
        self.size = 0
        self.small_digest: bytes | None = None
        self._blob = hashlib.sha256()

    def join(self, small: bytes) -> None:
        self.small_digest = hashlib.sha256(small).digest()
        self._blob.update(small)

    @property
    def blob_digest(self) -> bytes:
        return self._blob.digest()

    def write(self, data: bytes) -> None:
        try:
            self.file.write(data)
        except OSError as exc:
            self.abort()
            raise _storage_error(exc, self.partial) from None
        self.size += len(data)
        self._blob.update(data)

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as exc:
            self.abort()
            raise _storage_error(exc, self.partial) from None

    def sync(self) -> None:
        """Flush and fsync what is written so far."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as exc:
            raise _storage_error(exc, self.partial) from None

    def commit(self, final: Path) -> None:
        if self.small_digest is None:
            self.abort()
            raise AssertionError("a cache entry is committed before join(small)")
        trailer = _TRAILER.pack(_MAGIC, self.small_digest, self.blob_digest, self.size)
        displaced: BinaryIO | None = None
        try:
            # The trailer is written like the data: if it cannot be, nothing is committed.
            self.file.write(trailer)
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            displaced = _open_or_none(final)
            os.replace(self.partial, final)
            dir_fd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            if displaced is not None:
                displaced.close()
            self.abort()
            raise _storage_error(exc, final) from None
        if displaced is not None:
            # The entry replaced is freed when this last handle closes, by a thread of its
            # own: freeing a big file's blocks takes a while (0.3 s for 500 MB on ext4 with
            # discard), and the caller need not wait. The interpreter waits for it at exit.
            threading.Thread(target=displaced.close, name="cache-free").start()

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(OSError):
            self.partial.unlink()


def _open_or_none(path: Path) -> BinaryIO | None:
    try:
        return open(path, "rb")
    except OSError:
        return None


def _storage_error(exc: OSError, path: Path) -> LoaderError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientStorage(f"no space left on the device for {path}")
    return LoaderError(f"cannot write {path}: {exc.strerror}")


def spool_elsewhere() -> CacheWrite:
    """A temporary file outside the cache, for when the cache cannot be written."""
    fd, name = tempfile.mkstemp(prefix="azaion-loader-", suffix=_PARTIAL)
    return CacheWrite(Path(name), os.fdopen(fd, "wb"))
