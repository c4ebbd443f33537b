"""The model cache: big parts at MODEL_CACHE_DIR/FOLDER/NAME.big, written atomically.

A cache file appears whole or not at all: it is written under a temporary name in the
same folder, fsynced, and renamed. Each entry carries, in extended attributes, the SHA-256
of the small part it belongs to, so that a big part left over from an older upload of the
same name is known as stale even though CBC would decrypt it without complaint, and its
own SHA-256, so that damage on disk is caught.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from loader.errors import InsufficientStorage, LoaderError

log = logging.getLogger(__name__)

_PARTIAL = ".part"
_SMALL_DIGEST_ATTR = "user.azaion.small-sha256"
# The entry's own digest: a bit flipped on disk is caught before the stream's last block.
_BIG_DIGEST_ATTR = "user.azaion.big-sha256"


def small_digest(small: bytes) -> bytes:
    return hashlib.sha256(small).digest()


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

    def open(self, folder: str, name: str, small: bytes) -> CacheEntry | None:
        """The entry, open for reading, if it is there and belongs to this small part.

        One open file serves the checks and the stream: an entry removed meanwhile by
        someone else cannot vanish halfway.
        """
        try:
            file = open(self.path(folder, name), "rb")  # noqa: SIM115 - the entry owns it
        except OSError:
            return None
        fd = file.fileno()
        recorded = _attribute(fd, _SMALL_DIGEST_ATTR)
        if recorded is not None and recorded != small_digest(small):
            file.close()
            log.info("cached %s/%s.big belongs to an older upload: fetching it again", folder, name)
            return None
        return CacheEntry(file, os.fstat(fd).st_size, _attribute(fd, _BIG_DIGEST_ATTR))

    def begin(self) -> CacheWrite:
        """A new file under a temporary name in the cache; OSError when the cache is unusable."""
        self.root.mkdir(mode=0o750, parents=True, exist_ok=True)
        partial = self.root / f".incoming-{secrets.token_hex(8)}{_PARTIAL}"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        return CacheWrite(partial, os.fdopen(fd, "wb"))

    def commit(self, write: CacheWrite, folder: str, name: str, small: bytes) -> Path:
        """Make `write` the entry of FOLDER/NAME, tied to its small part."""
        final = self.path(folder, name)
        try:
            final.parent.mkdir(mode=0o750, exist_ok=True)
        except OSError as exc:
            write.abort()
            raise _storage_error(exc, final) from None
        write.commit(final, small)
        return final

    def discard(self, folder: str, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(folder, name).unlink()


@dataclass
class CacheEntry:
    """A cache entry open for reading; `digest` is None where attributes are not kept."""

    file: BinaryIO
    size: int
    digest: bytes | None


def _attribute(fd: int, name: str) -> bytes | None:
    try:
        return os.getxattr(fd, name)
    except OSError:
        return None  # not set, or no attribute support here


class CacheWrite:
    """A file being written: `commit` renames it into place whole, `abort` leaves nothing."""

    def __init__(self, partial: Path, file: BinaryIO) -> None:
        self.partial = partial
        self.file = file
        self.size = 0
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> None:
        try:
            self.file.write(data)
        except OSError as exc:
            self.abort()
            raise _storage_error(exc, self.partial) from None
        self.size += len(data)
        self.digest.update(data)

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

    def commit(self, final: Path, small: bytes) -> None:
        try:
            self.file.flush()
            with contextlib.suppress(OSError):
                os.setxattr(self.file.fileno(), _SMALL_DIGEST_ATTR, small_digest(small))
                os.setxattr(self.file.fileno(), _BIG_DIGEST_ATTR, self.digest.digest())
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.partial, final)
            dir_fd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            self.abort()
            raise _storage_error(exc, final) from None

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(OSError):
            self.partial.unlink()


def _storage_error(exc: OSError, path: Path) -> LoaderError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientStorage(f"no space left on the device for {path}")
    return LoaderError(f"cannot write {path}: {exc.strerror}")


def spool_elsewhere() -> CacheWrite:
    """A temporary file outside the cache, for when the cache cannot be written."""
    fd, name = tempfile.mkstemp(prefix="azaion-loader-", suffix=_PARTIAL)
    return CacheWrite(Path(name), os.fdopen(fd, "wb"))
