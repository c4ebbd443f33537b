"""The unlock workflow: log in, fetch the archive's key fragment, stream-decrypt the archive
into Docker, check that the whole stack is there. One at a time, in the background.

Nothing decrypted is ever written to disk by the loader: plaintext exists only in the
chunks handed to the Docker SDK, which streams them to the engine.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loader.crypto import BLOCK, Decryptor, key_from_fragment, plaintext_size
from loader.errors import (
    ArchiveMissing,
    ArchiveUnreadable,
    DecryptionFailed,
    InsufficientStorage,
    LoaderError,
)
from loader.images import Docker, stack_tags
from loader.log import Redactor
from loader.remote import ResourceAPI
from loader.settings import Settings
from loader.systemd import Notifier

log = logging.getLogger(__name__)

# Measured here (bench/ row 4b): 256 KiB reads decrypt fastest.
CHUNK = 256 * 1024
# Docker spools the whole tarball to its data root, then unpacks the layers beside it:
# measured at exactly twice the archive (bench/ row 3d), plus room to spare.
SPACE_FACTOR = 2
SPACE_MARGIN = 256 * 1000**2


class UnlockState(str, enum.Enum):
    IDLE = "idle"
    AUTHENTICATING = "authenticating"
    DOWNLOADING_KEY = "downloading_key"
    DECRYPTING = "decrypting"
    LOADING_IMAGES = "loading_images"
    READY = "ready"
    ERROR = "error"


class Cancelled(LoaderError):
    """The daemon is stopping: the load is abandoned and undone."""

    code = "unlock-cancelled"


@dataclass
class _Progress:
    """Written by the loading thread, read by the event loop: plain ints and a list, no locks."""

    state: UnlockState = UnlockState.IDLE
    error: str | None = None
    bytes_done: int = 0
    bytes_total: int = 0
    images: list[str] = field(default_factory=list)


class Unlocker:
    def __init__(
        self,
        settings: Settings,
        api: ResourceAPI,
        docker: Docker,
        notifier: Notifier,
        redact: Redactor,
    ) -> None:
        self._settings = settings
        self._redact = redact
        self._api = api
        self._docker = docker
        self._notifier = notifier
        self._progress = _Progress()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._cancel = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def status(self) -> dict[str, Any]:
        p = self._progress
        return {
            "state": p.state.value,
            "error": p.error,
            "bytesDone": p.bytes_done,
            "bytesTotal": p.bytes_total,
            "percent": _percent(p.bytes_done, p.bytes_total),
            "images": list(p.images),
        }

    async def start(self, email: str, password: str) -> UnlockState:
        """Start the workflow unless it runs already; answers the state it is in."""
        async with self._lock:
            if self.running:
                return self._progress.state
            tags = stack_tags(self._settings.api_version)
            archive = self._settings.images_path
            try:
                missing = await asyncio.to_thread(self._docker.missing, tags)
            except LoaderError:
                if not await asyncio.to_thread(archive.exists):
                    raise
                missing = tags  # Docker is down: the workflow says so in its error
            if not missing:
                self._finish_ready(tags)
                return UnlockState.READY
            if not await asyncio.to_thread(archive.exists):
                raise ArchiveMissing(
                    f"no image archive at {archive}, and Docker lacks {len(missing)} of the "
                    f"{len(tags)} images: {', '.join(missing)}"
                )
            self._cancel.clear()
            self._progress = _Progress(state=UnlockState.AUTHENTICATING)
            self._loop = asyncio.get_running_loop()
            self._task = asyncio.create_task(self._run(email, password))
            return self._progress.state

    async def stop(self, grace: float) -> None:
        """On shutdown: abandon the unlock; a load in progress gets `grace` s to undo itself."""
        if self._task is None or self._task.done():
            return
        self._cancel.set()
        if self._progress.state is not UnlockState.LOADING_IMAGES:
            self._task.cancel()
        done, _ = await asyncio.wait({self._task}, timeout=grace)
        if not done:
            log.warning("the image load did not stop within %.0f s: abandoning it", grace)
            self._task.cancel()

    async def _run(self, email: str, password: str) -> None:
        progress = self._progress
        self._report(progress)
        try:
            await self._workflow(progress, email, password)
        except LoaderError as exc:
            self._fail(progress, exc.message)
        except asyncio.CancelledError:
            self._fail(progress, "stopped: the daemon shut down during the unlock")
        except Exception as exc:
            log.exception("unlock failed unexpectedly")
            self._fail(progress, f"unexpected error: {exc}")

    async def _workflow(self, progress: _Progress, email: str, password: str) -> None:
        settings = self._settings
        log.info("unlock: logging in")
        await self._api.login(email, password)

        progress.state = UnlockState.DOWNLOADING_KEY
        self._report(progress)
        key = key_from_fragment(await self._api.fetch_archive_fragment())

        progress.state = UnlockState.DECRYPTING
        self._report(progress)
        archive = settings.images_path
        size = await asyncio.to_thread(_check_archive, archive, key)
        progress.bytes_total = size
        await asyncio.to_thread(self._check_space, size)

        progress.state = UnlockState.LOADING_IMAGES
        self._report(progress)
        tags = stack_tags(settings.api_version)
        before = await asyncio.to_thread(self._docker.tags)
        log.info("unlock: streaming %s (%s) into Docker", archive, _gb(size))
        try:
            await asyncio.to_thread(self._load, archive, key, progress)
            missing = await asyncio.to_thread(self._docker.missing, tags)
            if missing:
                raise DecryptionFailed(
                    f"the archive was loaded, but Docker still lacks {', '.join(missing)}"
                )
        except BaseException:
            await asyncio.shield(asyncio.to_thread(self._undo, before))
            raise
        self._finish_ready(tags)

    def _load(self, archive: Path, key: bytes, progress: _Progress) -> None:
        """In a worker thread: read, decrypt and hand the plaintext to Docker, chunk by chunk."""
        loop = self._loop
        assert loop is not None, "set by start()"

        def report() -> None:
            loop.call_soon_threadsafe(self._report, progress)

        def loaded(tag: str) -> None:
            progress.images.append(tag)
            report()

        source = _DecryptedArchive(archive, key, progress, self._cancel, report)
        try:
            self._docker.load(iter(source), on_loaded=loaded)
        except BaseException:
            # The SDK wraps what our generator raised (an OSError becomes a ConnectionError):
            # the generator's own error says what really went wrong.
            if source.error is not None:
                raise source.error from None
            raise
        if source.error is not None:
            raise source.error

    def _check_space(self, size: int) -> None:
        seen = self._docker.free_space()
        if seen is None:
            log.info("cannot see Docker's data root from here: not checking its free space")
            return
        root, free = seen
        needed = SPACE_FACTOR * size + SPACE_MARGIN
        if free < needed:
            raise InsufficientStorage(
                f"Docker needs about {_gb(needed)} free under {root} to load {_gb(size)} of "
                f"images (it spools the archive, then unpacks it), but only {_gb(free)} is free"
            )

    def _undo(self, before: set[str]) -> None:
        """Remove the stack's tags this attempt added: never leave half a stack behind."""
        try:
            added = (self._docker.tags() - before) & set(stack_tags(self._settings.api_version))
        except LoaderError as exc:
            log.warning("could not check what the failed load added: %s", exc.message)
            return
        self._docker.remove(sorted(added))

    def _finish_ready(self, tags: list[str]) -> None:
        p = self._progress
        p.state, p.error = UnlockState.READY, None
        p.images = list(tags)
        message = f"Ready: {len(tags)} images at {self._settings.api_version}"
        log.info("unlock: %s", message)
        self._notifier.status(message)

    def _fail(self, progress: _Progress, message: str) -> None:
        # /unlock/status is read by every member of the socket's group: redacted like the log.
        message = self._redact(message)
        progress.state, progress.error = UnlockState.ERROR, message
        log.error("unlock failed: %s", message)
        self._notifier.status(f"Unlock failed: {message}")

    def _report(self, progress: _Progress) -> None:
        """systemd's STATUS= line, e.g. "Unlocking: loading images 42% (1.3 of 3.1 GB)"."""
        if progress is self._progress and progress.state not in (
            UnlockState.READY,
            UnlockState.ERROR,
        ):
            self._notifier.status(_status_line(progress))


class _DecryptedArchive:
    """The archive's plaintext as an iterator of chunks, for the Docker SDK's chunked upload.

    It keeps its own error: the SDK wraps or replaces exceptions raised inside a body.
    """

    def __init__(
        self,
        path: Path,
        key: bytes,
        progress: _Progress,
        cancel: threading.Event,
        on_percent: Callable[[], None],
    ) -> None:
        self._path = path
        self._key = key
        self._progress = progress
        self._cancel = cancel
        self._on_percent = on_percent
        self.error: LoaderError | None = None

    def __iter__(self) -> Iterator[bytes]:
        decryptor = Decryptor(self._key)
        progress = self._progress
        percent = 0
        try:
            buffer = bytearray(CHUNK)
            view = memoryview(buffer)
            with open(self._path, "rb", buffering=0) as archive:
                while count := archive.readinto(buffer):
                    if self._cancel.is_set():
                        raise Cancelled("stopped: the daemon shut down during the unlock")
                    plain = decryptor.update(view[:count])
                    progress.bytes_done += count
                    if progress.bytes_done * 100 // progress.bytes_total > percent:
                        percent = progress.bytes_done * 100 // progress.bytes_total
                        self._on_percent()
                    if plain:
                        yield plain
            # The last block is released only when the padding checks out: a wrong key or a
            # damaged archive aborts the upload before its end, so Docker commits nothing.
            yield decryptor.finalize()
        except DecryptionFailed:
            self.error = DecryptionFailed(
                "the archive could not be decrypted: wrong key fragment, or the archive is "
                "damaged or truncated"
            )
            raise self.error from None
        except OSError as exc:
            self.error = ArchiveUnreadable(f"cannot read the archive {self._path}: {exc.strerror}")
            raise self.error from None
        except Cancelled as exc:
            self.error = exc
            raise


def _check_archive(path: Path, key: bytes) -> int:
    """The archive's size, once its tail shows that `key` decrypts it (PKCS7 padding checks)."""
    try:
        # A FIFO or a device would block open() or read forever.
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ArchiveUnreadable(f"cannot read the archive {path}: not a regular file")
        with open(path, "rb") as archive:
            size = os.fstat(archive.fileno()).st_size
            if size < 3 * BLOCK:
                raise DecryptionFailed(
                    f"the archive {path} is too short ({size} bytes) to hold images"
                )
            archive.seek(size - 2 * BLOCK)
            tail = archive.read(2 * BLOCK)
    except FileNotFoundError:
        raise ArchiveMissing(f"no image archive at {path}") from None
    except OSError as exc:
        raise ArchiveUnreadable(f"cannot read the archive {path}: {exc.strerror}") from None
    try:
        plaintext_size(key, size, tail)
    except DecryptionFailed:
        raise DecryptionFailed(
            "the archive could not be decrypted: wrong key fragment, or the archive is "
            "damaged or truncated"
        ) from None
    return size


def _status_line(p: _Progress) -> str:
    if p.state is UnlockState.LOADING_IMAGES and p.bytes_total:
        if p.bytes_done < p.bytes_total:
            return (
                f"Unlocking: loading images {_percent(p.bytes_done, p.bytes_total):.0f}% "
                f"({p.bytes_done / 1e9:.1f} of {_gb(p.bytes_total)})"
            )
        return f"Unlocking: Docker is registering the images ({len(p.images)} loaded)"
    return f"Unlocking: {p.state.value.replace('_', ' ')}"


def _percent(done: int, total: int) -> float:
    return round(100 * done / total, 1) if total else 0.0


def _gb(size: int) -> str:
    return f"{size / 1e9:.1f} GB"
