"""The unlock workflow: log in, fetch the archive's key fragment, index the archive from its
tar headers, then load the stack into the engine image by image, each as its own small tar
holding only the layers the engine lacks, and check each image's ID. One at a time, in the
background.

An unlock cut short (a power cut, the engine stopping, a bad image) keeps the images it
completed, each whole under its tag with the archive's ID: the next one sends only what is
missing. Nothing decrypted is ever written to disk by the loader: plaintext exists only in
the chunks handed to the Docker SDK, which streams them to the engine.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loader.archive import (
    EncryptedArchive,
    Image,
    image_tar,
    index_members,
    layers_present,
    read_images,
    starts_as_a_tar,
)
from loader.crypto import key_from_fragment
from loader.errors import (
    ArchiveMissing,
    ArchiveUnreadable,
    DecryptionFailed,
    DockerFailed,
    InsufficientStorage,
    LoaderError,
)
from loader.images import Docker, EngineImage, gigabytes, space_shortfall, stack_tags
from loader.log import Redactor
from loader.metrics import Metrics
from loader.progress import (
    Flight,
    Progress,
    UnlockState,
    grow,
    handed_over,
    land,
    percent_done,
    registered,
    status_line,
    take_off,
)
from loader.remote import ResourceAPI
from loader.settings import Settings

log = logging.getLogger(__name__)

# The archive is read and decrypted in pieces of this size: measured here (bench/ row 4b),
# 256 KiB reads decrypt fastest.
ARCHIVE_READ = 256 * 1024
# Images loaded at once (bench/ rows 1c, 1d): the engine registers one image's layers while
# the next arrives. Docker 20.10 loads the images after the first 15% faster two at a time
# (three: 18%), Podman 36% (three: no better). A second image joins only while the bytes in
# flight stay within the largest image's: the engine's spool never holds more than that.
CONCURRENCY = 2
# Podman's API writes a loaded tar to its temporary folder and stages its blobs there again
# before committing them to its storage; an OCI archive (a thin image) it unpacks there too.
PODMAN_WHOLE_COPIES = 2
PODMAN_THIN_COPIES = 3


class Cancelled(LoaderError):
    """The daemon is stopping: the load is abandoned and undone."""

    code = "unlock-cancelled"


@dataclass(frozen=True)
class _Send:
    """An image to load: its tag, and the digests of the layers the engine has already."""

    tag: str
    image: Image
    present: frozenset[str]
    # The images of this unlock that bring layers this one leaves out: they go first.
    after: frozenset[str] = frozenset()

    @property
    def size(self) -> int:
        return self.image.size - sum(
            layer.member.size for layer in self.image.layers if layer.digest in self.present
        )


class Unlocker:
    def __init__(
        self,
        settings: Settings,
        api: ResourceAPI,
        docker: Docker,
        status: Callable[[str], None],
        redact: Redactor,
        metrics: Metrics | None = None,
    ) -> None:
        """`status` takes a line on the unlock's progress for people (app.py hands it to
        systemd's STATUS=): the workflow knows nothing of who shows it."""
        self._settings = settings
        self._redact = redact
        self._metrics = metrics or Metrics()
        self._api = api
        self._docker = docker
        self._status = status
        self._progress = Progress()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._cancel = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def state(self) -> UnlockState:
        return self._progress.state

    @property
    def images_present(self) -> int:
        """The stack's images in the engine, as the last unlock found or loaded them."""
        return len(self._progress.images)

    @property
    def images_expected(self) -> int:
        return len(stack_tags(self._settings.api_version))

    def status(self) -> dict[str, Any]:
        p = self._progress
        return {
            "state": p.state.value,
            "error": p.error,
            "bytesDone": p.bytes_done,
            "bytesTotal": p.bytes_total,
            "percent": percent_done(p),
            "images": list(p.images),
            "imagesDone": len(p.images),
            "imagesTotal": p.images_total,
            "image": p.image,
        }

    async def start(self, email: str, password: str) -> UnlockState:
        """Start the workflow unless it runs already; answers the state it is in."""
        async with self._lock:
            if self.running:
                return self._progress.state
            try:
                return await self._start(email, password)
            except LoaderError as exc:
                self._metrics.unlock_attempted(exc.code)
                raise

    async def _start(self, email: str, password: str) -> UnlockState:
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
            self._metrics.unlock_attempted("already-ready")
            return UnlockState.READY
        if not await asyncio.to_thread(archive.exists):
            raise ArchiveMissing(
                f"no image archive at {archive}, and Docker lacks {len(missing)} of the "
                f"{len(tags)} images: {', '.join(missing)}"
            )
        self._cancel.clear()
        self._progress = Progress(state=UnlockState.AUTHENTICATING)
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
        started = time.monotonic()
        outcome = "ready"
        try:
            await self._workflow(progress, email, password)
        except LoaderError as exc:
            outcome = exc.code
            self._fail(progress, exc.message)
        except asyncio.CancelledError:
            outcome = Cancelled.code
            self._fail(progress, "stopped: the daemon shut down during the unlock")
        except Exception as exc:
            outcome = LoaderError.code
            log.exception("unlock failed unexpectedly")
            self._fail(progress, f"unexpected error: {exc}")
        finally:
            self._metrics.unlock_ran(outcome, time.monotonic() - started, progress.bytes_done)

    async def _workflow(self, progress: Progress, email: str, password: str) -> None:
        settings = self._settings
        log.info("unlock: logging in")
        await self._api.login(email, password)

        progress.state = UnlockState.DOWNLOADING_KEY
        self._report(progress)
        key = key_from_fragment(await self._api.fetch_archive_fragment())

        progress.state = UnlockState.DECRYPTING
        self._report(progress)
        tags = stack_tags(settings.api_version)
        # The engine first: one that is away says so before the archive is read.
        engine = await asyncio.to_thread(self._docker.inspect, tags)
        archive = await asyncio.to_thread(_open_archive, settings.images_path, key)
        try:
            sends = await asyncio.to_thread(self._plan, archive, tags, engine)
            progress.images = [tag for tag in tags if tag not in {send.tag for send in sends}]
            progress.images_total = len(tags)
            progress.bytes_total = sum(send.size for send in sends)
            await asyncio.to_thread(self._check_space, sends)

            progress.state = UnlockState.LOADING_IMAGES
            self._report(progress)
            log.info(
                "unlock: loading %d of %d images (%s) from %s",
                len(sends),
                len(tags),
                gigabytes(progress.bytes_total),
                settings.images_path,
            )
            await self._load_all(archive, sends, progress)
        finally:
            await asyncio.shield(asyncio.to_thread(archive.close))
        self._finish_ready(tags)

    async def _load_all(
        self, archive: EncryptedArchive, sends: list[_Send], progress: Progress
    ) -> None:
        """Load the images, up to CONCURRENCY at a time while the bytes in flight stay within
        the largest image's, each after those that bring layers it leaves out. After a
        failure no other image starts; those in flight finish (and are kept if whole), and
        the first failure is the unlock's."""
        budget = max((send.size for send in sends), default=0)
        waiting = list(sends)
        running: dict[asyncio.Future[None], _Send] = {}
        done: set[str] = set()
        failure: BaseException | None = None
        try:
            while waiting or running:
                while failure is None and len(running) < CONCURRENCY:
                    ready = next((send for send in waiting if send.after <= done), None)
                    flying = sum(send.size for send in running.values())
                    if ready is None or (running and flying + ready.size > budget):
                        break
                    waiting.remove(ready)
                    loading = asyncio.ensure_future(
                        asyncio.to_thread(self._load_image, archive, ready, progress)
                    )
                    running[loading] = ready
                if not running:
                    break
                finished, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for ended in finished:
                    send = running.pop(ended)
                    error = ended.exception()
                    if error is None:
                        done.add(send.tag)
                    elif failure is None:
                        failure = error
        finally:
            # Cancelled: the threads stop at the cancel event; their ends are collected.
            for left in running:
                left.add_done_callback(_collect)
        if failure is not None:
            raise failure

    def _plan(
        self, archive: EncryptedArchive, tags: list[str], engine: dict[str, EngineImage]
    ) -> list[_Send]:
        """In a worker thread: what to load, from the archive's index and the engine's images.

        An image the engine has under its tag with the archive's ID is kept; each other one
        is sent with the layers the engine will have by then left out.
        """
        images: dict[str, Image] = {}
        for image in read_images(archive, index_members(archive)):
            images.update((tag, image) for tag in image.tags)
        lacking = [tag for tag in tags if tag not in images]
        if lacking:
            raise DecryptionFailed(
                f"the archive does not hold {', '.join(lacking)}: it is not the archive of "
                f"this stack at {self._settings.api_version}; nothing was loaded"
            )
        layers = [each.layers for each in engine.values()]
        brought: dict[str, str] = {}  # layer digest -> the image of this unlock that brings it
        sends = []
        for tag in tags:
            image = images[tag]
            if tag in engine and engine[tag].whole and engine[tag].id in image.ids:
                continue
            present = frozenset(layers_present(image, layers))
            after = frozenset(brought[d] for d in present if d in brought)
            sends.append(_Send(tag, image, present, after))
            for layer in image.layers:
                if layer.digest not in present:
                    brought.setdefault(layer.digest, tag)
            layers.append(tuple(layer.digest for layer in image.layers))
        return sends

    def _load_image(self, archive: EncryptedArchive, send: _Send, progress: Progress) -> None:
        """In a worker thread: one image into the engine, then its ID and its completeness
        checked. An engine that took a thin tar but left the image incomplete (Docker's
        containerd store, when it holds the shared layers under other digests) gets it whole."""
        loop = self._loop
        assert loop is not None, "set by start()"

        def report() -> None:
            loop.call_soon_threadsafe(self._report, progress)

        flight = take_off(progress, send.tag, send.size)
        report()
        try:
            self._load_checked(archive, send, flight, progress, report)
        except BaseException:
            land(progress, flight, loaded=False)
            raise
        land(progress, flight, loaded=True)
        log.info(
            "unlock: %s loaded (%d of %d)", send.tag, len(progress.images), progress.images_total
        )
        report()

    def _load_checked(
        self,
        archive: EncryptedArchive,
        send: _Send,
        flight: Flight,
        progress: Progress,
        report: Callable[[], None],
    ) -> None:
        """Send the image, check that the engine holds it whole with the archive's ID. A
        thin load the engine refuses or leaves incomplete is sent again whole (an engine
        that takes no thin tar gets whole ones); anything else under the tag goes."""
        if send.present and progress.whole_only:
            whole = _Send(send.tag, send.image, frozenset())
            grow(progress, flight, whole.size - send.size)
            send = whole
        try:
            self._send(archive, send, flight, progress, report)
        except DockerFailed as exc:
            self._drop_if_incomplete(send.tag)
            if not send.present:
                raise
            log.warning(
                "unlock: %s refused %s without the layers it has (%s): sending it whole",
                self._docker.name,
                send.tag,
                exc.message,
            )
            send = _Send(send.tag, send.image, frozenset())
            grow(progress, flight, send.size)
            try:
                self._send(archive, send, flight, progress, report)
            except DockerFailed:
                self._drop_if_incomplete(send.tag)
                raise
            if not progress.whole_only:
                log.warning(
                    "unlock: %s took %s whole but not thin: the other images go whole too",
                    self._docker.name,
                    send.tag,
                )
                progress.whole_only = True
        engine = self._docker.inspect([send.tag]).get(send.tag)
        if engine is not None and not engine.whole and engine.id in send.image.ids and send.present:
            log.warning(
                "unlock: %s took %s without the layers it has but left it incomplete: "
                "sending it whole",
                self._docker.name,
                send.tag,
            )
            whole = _Send(send.tag, send.image, frozenset())
            grow(progress, flight, whole.size)  # the work grew by a second load
            self._send(archive, whole, flight, progress, report)
            send = whole
            engine = self._docker.inspect([send.tag]).get(send.tag)
        if engine is None or not engine.whole or engine.id not in send.image.ids:
            if engine is not None:
                self._docker.remove([send.tag])
            held = "no such image" if engine is None else engine.id
            if engine is not None and not engine.whole:
                held = f"{engine.id}, incomplete"
            raise DockerFailed(
                f"{self._docker.name} loaded {send.tag} but holds {held}, "
                f"not the archive's {send.image.id}"
            )

    def _drop_if_incomplete(self, tag: str) -> None:
        """After a refused load: Docker's containerd store keeps the image under its tag,
        incomplete. Remove it, so that no stack tag names an image that is not whole."""
        try:
            engine = self._docker.inspect([tag]).get(tag)
        except LoaderError:
            return  # the engine is away; the next unlock sees the image as missing anyway
        if engine is not None and not engine.whole:
            self._docker.remove([tag])

    def _send(
        self,
        archive: EncryptedArchive,
        send: _Send,
        flight: Flight,
        progress: Progress,
        report: Callable[[], None],
    ) -> None:
        """Stream one image's tar into the engine; the flight's `sent` grows by `send.size`."""
        started = flight.sent
        podman = self._docker.name == "Podman"
        source = _ImageStream(archive, send, flight, progress, self._cancel, report, podman)
        try:
            self._docker.load(iter(source))
            registered(progress, flight)
        except BaseException as exc:
            flight.registering_since = None
            # The SDK wraps what our generator raised (an OSError becomes a ConnectionError):
            # the generator's own error says what really went wrong.
            if source.error is not None:
                raise source.error from None
            if isinstance(exc, DockerFailed):
                raise DockerFailed(f"{exc.message} (loading {send.tag})") from None
            raise
        if source.error is not None:
            raise source.error
        flight.sent = started + send.size

    def _check_space(self, sends: list[_Send]) -> None:
        """Refuse early when the engine lacks room for the layers it will keep plus what it
        spools while it loads: Docker, the image's tar in its data root; Podman, in its
        temporary folder, a whole image twice (the tar, its blobs staged for storage) and a
        thin one three times (unpacked too) (bench/ row 1e). Images in flight together hold
        at most the largest image's bytes."""
        spools = self._docker.spools()
        if not spools:
            log.info("cannot see where the engine keeps its images: not checking free space")
            return
        shortfall = space_shortfall(
            self._docker.name,
            spools,
            layers=sum(send.size for send in sends),
            largest=max((send.size for send in sends), default=0),
            podman_spool=_podman_spool(sends),
        )
        if shortfall:
            raise InsufficientStorage(shortfall)

    def _finish_ready(self, tags: list[str]) -> None:
        p = self._progress
        p.state, p.error = UnlockState.READY, None
        p.images = list(tags)
        message = f"Ready: {len(tags)} images at {self._settings.api_version}"
        log.info("unlock: %s", message)
        self._status(message)

    def _fail(self, progress: Progress, message: str) -> None:
        # /unlock/status is read by every member of the socket's group: redacted like the log.
        message = self._redact(message)
        progress.state, progress.error = UnlockState.ERROR, message
        log.error("unlock failed: %s", message)
        self._status(f"Unlock failed: {message}")

    def _report(self, progress: Progress) -> None:
        """The status line, e.g. "Unlocking: loading images 42% (1.3 of 3.1 GB)"."""
        if progress is self._progress and progress.state not in (
            UnlockState.READY,
            UnlockState.ERROR,
        ):
            self._status(status_line(progress))


class _ImageStream:
    """One image's tar as an iterator of chunks, for the Docker SDK's chunked upload.

    It keeps its own error: the SDK wraps or replaces exceptions raised inside a body.
    """

    def __init__(
        self,
        archive: EncryptedArchive,
        send: _Send,
        flight: Flight,
        progress: Progress,
        cancel: threading.Event,
        on_percent: Callable[[], None],
        podman: bool,
    ) -> None:
        self._archive = archive
        self._podman = podman
        self._send = send
        self._flight = flight
        self._progress = progress
        self._cancel = cancel
        self._on_percent = on_percent
        self.error: LoaderError | None = None

    def __iter__(self) -> Iterator[bytes]:
        progress, flight = self._progress, self._flight
        percent = percent_done(progress)
        # The tar's own headers are not counted: bytesDone stays within bytesTotal.
        limit = flight.sent + self._send.size
        started = time.monotonic()
        try:
            send = self._send
            for chunk in image_tar(
                self._archive, send.image, send.present, ARCHIVE_READ, podman=self._podman
            ):
                if self._cancel.is_set():
                    raise Cancelled("stopped: the daemon shut down during the unlock")
                flight.sent = min(flight.sent + len(chunk), limit)
                if percent_done(progress) >= percent + 1:
                    percent = percent_done(progress)
                    self._on_percent()
                yield chunk
            handed_over(progress, flight, self._send.size, time.monotonic() - started)
        except DecryptionFailed as exc:
            self.error = exc
            raise
        except OSError as exc:
            self.error = ArchiveUnreadable(f"cannot read the archive: {exc.strerror}")
            raise self.error from None
        except Cancelled as exc:
            self.error = exc
            raise


def _open_archive(path: Path, key: bytes) -> EncryptedArchive:
    """The archive, once its tail shows that `key` decrypts it (PKCS7 padding checks)."""
    try:
        # A FIFO or a device would block open() or read forever.
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ArchiveUnreadable(f"cannot read the archive {path}: not a regular file")
        archive = EncryptedArchive.open(path, key)
    except FileNotFoundError:
        raise ArchiveMissing(f"no image archive at {path}") from None
    except OSError as exc:
        raise ArchiveUnreadable(f"cannot read the archive {path}: {exc.strerror}") from None
    except DecryptionFailed:
        raise _undecryptable() from None
    if not starts_as_a_tar(archive):
        archive.close()
        raise _undecryptable()
    return archive


def _undecryptable() -> DecryptionFailed:
    return DecryptionFailed(
        "the archive could not be decrypted: wrong key fragment, or the archive is damaged, "
        "truncated or not a docker save tar"
    )


def _podman_spool(sends: list[_Send]) -> int:
    """The peak of Podman's temporary folder: the images in flight hold at most the largest
    image's bytes, each spooled twice when whole, three times when thin."""
    largest = max((send.size for send in sends), default=0)
    copies = PODMAN_THIN_COPIES if any(send.present for send in sends) else PODMAN_WHOLE_COPIES
    return copies * largest


def _collect(future: asyncio.Future[None]) -> None:
    """Retrieve a loading thread's end after the workflow stopped waiting for it."""
    if not future.cancelled():
        future.exception()
