"""One /upload, from the caller's body to a published resource (resource-api.md, "Upload").

The plaintext is encrypted with a fresh IV as it arrives, and the ciphertext is cut and
spooled (never the plaintext): the small part stays in memory, the big part goes to a spool
file. When the folder is known before the file (it comes first in the form), the big part is
sent to the CDN from that spool while the spool still grows, so an upload takes about as long
as the longer of receiving and sending rather than their sum. The PUT's last bytes wait until
the whole form has been read and found valid: a body cut short, too large or malformed never
completes a PUT, and the CDN keeps the previous big part.

The PUT goes with a Content-Length when the size is known in advance (the file part declares
its length), and chunked otherwise. A CDN that refuses a chunked PUT gets the big part again
with its length, once the body has arrived, as every upload did before; the daemon remembers
that and stops trying.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from loader.cache import CacheWrite
from loader.crypto import SMALL_PART_MAX, Encryptor, encrypted_size, small_part_size
from loader.errors import PayloadTooLarge, ValidationFailed
from loader.integrity import IntegrityRecord
from loader.remote import FILE_READ, ChunkedRefused, ResourceAPI, file_chunks

log = logging.getLogger(__name__)

# Blobs at least this long are cut at exactly SMALL_PART_MAX (0.3 * 10240 = 3072).
_FULL_CUT_FROM = SMALL_PART_MAX * 10 // 3
# The caller's plaintext is encrypted and spooled by workers in batches of about this size.
_BATCH = 1024 * 1024
# The spool is synced to disk in the background each time this much more is written, so
# that the sync before the cache commit finds little left to write.
_SYNC_EVERY = 32 * 1024 * 1024
# What a PUT following the spool keeps back until the form is known to be valid: with it the
# CDN never receives a whole body (by its length, or the last chunk) of an upload that failed.
_HOLD_BACK = 16


@dataclass
class SpooledBlob:
    """An encrypted upload, cut: the small part in memory, the big part in a file."""

    small: bytes
    big: CacheWrite
    plaintext_size: int

    @property
    def record(self) -> IntegrityRecord:
        return IntegrityRecord(self.big.blob_digest, len(self.small) + self.big.size)


def big_part_size(plaintext_size: int) -> int:
    """The big part's size for a plaintext of `plaintext_size` bytes."""
    blob = encrypted_size(plaintext_size)
    return blob - small_part_size(blob)


class Upload:
    """One upload in flight: its spool, and the PUT of the big part when it runs alongside.

    `receive` the body, then `publish` it or `discard` it; `discard` is always safe to call.
    """

    def __init__(
        self,
        api: ResourceAPI,
        key: bytes,
        spool: CacheWrite,
        limit: int,
        *,
        target: tuple[str, str] | None = None,
        declared: int | None = None,
    ) -> None:
        self._api = api
        self._spool = spool
        self._limit = limit
        self._declared = declared
        self._cutter = _Cutter(Encryptor(key), spool)
        self._target = target
        self.blob: SpooledBlob | None = None
        # How far the spool may be read, and whether it is whole and the form valid.
        self._available = 0
        self._complete = False
        self._sealed = False
        self._changed = asyncio.Condition()
        self._put: asyncio.Task[None] | None = None
        self._syncing: asyncio.Future[None] | None = None
        self._synced = 0
        # The big part goes while the body arrives: chunked, or with the declared length.
        if target is not None and (declared is not None or not api.chunked_refused):
            size = None if declared is None else big_part_size(declared)
            self._put = asyncio.ensure_future(self._send_while_spooling(*target, size))

    async def receive(self, chunks: AsyncIterator[bytes]) -> None:
        """Encrypt the caller's plaintext as it arrives into the spool (then `blob`).

        Three stages run side by side, each on its own batch: this task gathers the next
        batch from the socket, a worker encrypts the one before, and another worker cuts,
        hashes and spools the one before that."""
        received = 0
        batch: list[bytes] = []
        batched = 0
        encrypting: asyncio.Future[list[bytes]] | None = None
        spooling: asyncio.Future[None] | None = None
        try:
            async for chunk in chunks:
                received += len(chunk)
                self._check_length(received)
                batch.append(chunk)
                batched += len(chunk)
                if batched >= _BATCH:
                    if encrypting is not None:
                        ciphertext = await encrypting
                        if spooling is not None:
                            await spooling
                            await self._advance()
                        spooling = asyncio.ensure_future(
                            asyncio.to_thread(self._cutter.take, ciphertext)
                        )
                    encrypting = asyncio.ensure_future(
                        asyncio.to_thread(self._cutter.encrypt, batch)
                    )
                    batch, batched = [], 0
            if self._declared is not None and received != self._declared:
                raise ValidationFailed(
                    f"body.data: the file part declares {self._declared} bytes "
                    f"(Content-Length), but {received} came"
                )
            if encrypting is not None:
                ciphertext = await encrypting
                if spooling is not None:
                    await spooling
                await asyncio.to_thread(self._cutter.take, ciphertext)
            small = await asyncio.to_thread(self._cutter.finish, batch)
        except BaseException:
            # Let the workers finish before the spool is thrown away.
            for job in (encrypting, spooling):
                if job is not None:
                    with contextlib.suppress(Exception):
                        await job
            raise
        self.blob = SpooledBlob(small, self._spool, received)
        await self._advance(complete=True)

    def _check_length(self, received: int) -> None:
        if received > self._limit:
            raise PayloadTooLarge(
                f"the upload is larger than MAX_UPLOAD_BYTES ({self._limit} bytes)"
            )
        if self._declared is not None and received > self._declared:
            raise ValidationFailed(
                f"body.data: the file part declares {self._declared} bytes (Content-Length), "
                "but more came"
            )

    async def publish(self, folder: str, name: str) -> SpooledBlob:
        """Big part to the CDN, then the small part to the API (the small part makes it
        loadable), then the integrity record (resource-api.md: after both parts, so that a
        half-done upload leaves a record that fails loudly)."""
        blob = self.blob
        if blob is None:
            raise AssertionError("publish() before receive() returned")
        # The spool reaches the disk while the parts travel: the commit's fsync is then quick.
        await self._synced_so_far()
        syncing = asyncio.ensure_future(asyncio.to_thread(blob.big.sync))
        try:
            await self._send_big_part(folder, name, blob)
            await self._api.upload_small_part(folder, name, blob.small)
            await self._api.upload_integrity_record(folder, name, blob.record.to_json())
        finally:
            with contextlib.suppress(Exception):
                await syncing
        return blob

    async def _send_big_part(self, folder: str, name: str, blob: SpooledBlob) -> None:
        if self._put is not None and self._target == (folder, name):
            async with self._changed:
                self._sealed = True
                self._changed.notify_all()
            try:
                await self._put
                return
            except ChunkedRefused as refused:
                log.info("%s: sending the big part again, with its length", refused.message)
                await self._put_whole(folder, name, blob)
                if not self._api.chunked_refused:
                    self._api.chunked_refused = True
                    log.warning(
                        "the CDN refuses a big part sent chunked (%s) and takes it with its "
                        "length: from now on each upload sends its big part after the whole "
                        "body has arrived, which is slower",
                        refused.message,
                    )
                return
        await self._put_whole(folder, name, blob)

    async def _put_whole(self, folder: str, name: str, blob: SpooledBlob) -> None:
        path = blob.big.partial
        await self._api.put_big_part(folder, name, lambda: file_chunks(path), blob.big.size)

    async def discard(self) -> None:
        """Stop the PUT in flight, which the CDN then never sees whole, and remove the spool."""
        if self._put is not None and not self._put.done():
            self._put.cancel()
        if self._put is not None:
            with contextlib.suppress(BaseException):
                await self._put
        await self._synced_so_far()
        await asyncio.to_thread(self._spool.abort)

    async def _synced_so_far(self) -> None:
        """Wait for the background sync, if one runs: it must not outlive the spool."""
        if self._syncing is not None:
            with contextlib.suppress(Exception):
                await self._syncing

    # The PUT that follows the spool

    async def _advance(self, complete: bool = False) -> None:
        size = self._spool.size
        if size - self._synced >= _SYNC_EVERY and (self._syncing is None or self._syncing.done()):
            self._synced = size
            self._syncing = asyncio.ensure_future(asyncio.to_thread(self._spool.sync))
        async with self._changed:
            self._available = size
            self._complete = complete
            self._changed.notify_all()

    def _moved(self, sent: int) -> bool:
        """Whether a follower that has sent `sent` bytes may send more, or end."""
        return self._available - _HOLD_BACK > sent or (self._complete and self._sealed)

    async def _send_while_spooling(self, folder: str, name: str, size: int | None) -> None:
        await self._api.put_big_part(folder, name, self._follow, size)

    async def _follow(self) -> AsyncIterator[bytes]:
        """The spool from its start, as far as it is written; the last bytes once the upload
        is whole and valid. Made anew for each attempt (a 401 sends it again from the start)."""
        # Opened here, not in a worker: a cancel while a worker opens it would leak the file.
        source = open(self._spool.partial, "rb")  # noqa: SIM115, ASYNC230 - closed below
        try:
            sent = 0
            while True:
                final = self._complete and self._sealed
                readable = self._available if final else self._available - _HOLD_BACK
                if sent < readable:
                    chunk = await asyncio.to_thread(source.read, min(FILE_READ, readable - sent))
                    if not chunk:
                        raise ValidationFailed("the upload's spool ended early")
                    sent += len(chunk)
                    yield chunk
                elif final:
                    return
                else:
                    async with self._changed:
                        await self._changed.wait_for(functools.partial(self._moved, sent))
        finally:
            source.close()


class _Cutter:
    """Encrypts batches and cuts the blob: the first SMALL_PART_MAX bytes stay in memory
    until the blob is long enough for the cut to be certain; the rest goes to the spool.
    `encrypt` runs in one worker at a time, in order; so does `take`, beside it."""

    def __init__(self, encryptor: Encryptor, spool: CacheWrite) -> None:
        self._encryptor = encryptor
        self._spool = spool
        self._head = bytearray()
        self._cut_known = False

    def encrypt(self, plaintext: list[bytes]) -> list[bytes]:
        return [piece for chunk in plaintext for piece in self._encryptor.pieces(chunk)]

    def take(self, ciphertext: list[bytes]) -> None:
        """Spool `ciphertext`, or keep it in the head while the cut is not known."""
        for piece in ciphertext:
            if self._cut_known:
                self._spool.write(piece)
                continue
            self._head += piece
            if len(self._head) >= _FULL_CUT_FROM:
                self._cut_known = True
                self._spool.join(bytes(self._head[:SMALL_PART_MAX]))
                self._spool.write(bytes(self._head[SMALL_PART_MAX:]))
                del self._head[SMALL_PART_MAX:]
        self._spool.flush()  # readable by the PUT that follows the spool

    def finish(self, plaintext: list[bytes]) -> bytes:
        """The last plaintext; returns the small part, with the big part spooled."""
        self.take([*self.encrypt(plaintext), self._encryptor.finalize()])
        if not self._cut_known:
            blob = bytes(self._head)
            cut = small_part_size(len(blob))
            self._spool.join(blob[:cut])
            self._spool.write(blob[cut:])
            self._spool.flush()
            self._head = bytearray(blob[:cut])
        return bytes(self._head)
