"""Resources (AI models): the big/small split of resource-api.md, both ways, and the cache.

Upload: encrypt with a fresh IV while reading the caller's body, spool the ciphertext
(never the plaintext), send the big part to the CDN and then the small part to the API,
and keep the big part in the cache. Load: small part from the API, big part from the
cache or the CDN, decrypt `small || big` while streaming it to the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass

from loader.cache import CacheEntry, CacheWrite, ModelCache, spool_elsewhere
from loader.crypto import (
    SMALL_PART_MAX,
    Decryptor,
    Encryptor,
    key_from_fragment,
    plaintext_size,
    small_part_size,
)
from loader.errors import (
    DecryptionFailed,
    InvalidName,
    LoaderError,
    NotAuthenticated,
    PayloadTooLarge,
)
from loader.remote import TAIL, ResourceAPI
from loader.settings import Settings

log = logging.getLogger(__name__)

# resource-api.md, "Names".
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
# Blobs at least this long are cut at exactly SMALL_PART_MAX (0.3 * 10240 = 3072).
_FULL_CUT_FROM = SMALL_PART_MAX * 10 // 3
# Reads and writes of big parts go to a worker thread in pieces of this size.
CHUNK = 1024 * 1024
# /load's pieces: two are in memory at once (one sent, one decrypted ahead), beside the
# socket's write buffer; 512 KiB keeps the peak RSS well under 80 MB (bench/).
LOAD_PIECE = 512 * 1024


def check_name(kind: str, value: str) -> str:
    """`value` if it is a valid folder or resource name; InvalidName otherwise."""
    if _NAME.fullmatch(value) and ".." not in value:
        return value
    shown = value if len(value) <= 64 else value[:64] + "..."
    raise InvalidName(
        f"invalid {kind} {shown!r}: use 1 to 255 letters, digits, '.', '_' or '-', "
        "starting with a letter or digit, without '..'"
    )


@dataclass
class Plaintext:
    """A decrypted resource on its way to the caller: its exact size, then its bytes."""

    size: int
    chunks: AsyncGenerator[bytes, None]
    # Releases what `chunks` holds should it never be iterated.
    close: Callable[[], None] = lambda: None


@dataclass
class SpooledBlob:
    """An encrypted upload, cut: the small part in memory, the big part in a file."""

    small: bytes
    big: CacheWrite
    plaintext_size: int


class Resources:
    def __init__(self, settings: Settings, api: ResourceAPI, cache: ModelCache) -> None:
        self._settings = settings
        self._api = api
        self._cache = cache
        self._downloads: dict[tuple[str, str], asyncio.Task[bool]] = {}
        self._cache_warned = False

    def require_login(self) -> None:
        if not self._api.authenticated:
            raise NotAuthenticated("not logged in: call /login with the Resource API credentials")

    # Upload

    async def encrypt_upload(self, chunks: AsyncIterator[bytes]) -> SpooledBlob:
        """Encrypt the caller's plaintext as it arrives; the big part goes to a spool file."""
        self.require_login()
        key = key_from_fragment(await self._api.fetch_resource_fragment())
        spool = await self._open_spool()
        try:
            return await self._encrypt_into(key, chunks, spool)
        except BaseException:
            await asyncio.to_thread(spool.abort)
            raise

    async def _encrypt_into(
        self, key: bytes, chunks: AsyncIterator[bytes], spool: CacheWrite
    ) -> SpooledBlob:
        limit = self._settings.max_upload_bytes
        cutter = _Cutter(Encryptor(key), spool)
        received = 0
        batch: list[bytes] = []
        batched = 0
        # One batch at a time in a worker: it joins, encrypts and spools while the next arrives.
        job: asyncio.Future[None] | None = None
        try:
            async for chunk in chunks:
                received += len(chunk)
                if received > limit:
                    raise PayloadTooLarge(
                        f"the upload is larger than MAX_UPLOAD_BYTES ({limit} bytes)"
                    )
                batch.append(chunk)
                batched += len(chunk)
                if batched >= CHUNK:
                    if job is not None:
                        await job
                    job = asyncio.ensure_future(asyncio.to_thread(cutter.feed, batch))
                    batch, batched = [], 0
            if job is not None:
                await job
            small = await asyncio.to_thread(cutter.finish, batch)
        except BaseException:
            if job is not None:  # let the worker finish before the spool is thrown away
                with contextlib.suppress(Exception):
                    await job
            raise
        return SpooledBlob(small, spool, received)

    async def publish(self, folder: str, name: str, blob: SpooledBlob) -> None:
        """Big part to the CDN, then the small part to the API (the small part makes it
        loadable), then the big part into the cache."""
        # The spool reaches the disk while the parts travel: the commit's fsync is then quick.
        syncing = asyncio.ensure_future(asyncio.to_thread(blob.big.sync))
        try:
            await self._api.put_big_part(folder, name, blob.big.partial, blob.big.size)
            await self._api.upload_small_part(folder, name, blob.small)
        finally:
            with contextlib.suppress(Exception):
                await syncing
        log.info("uploaded %s/%s (%d bytes)", folder, name, blob.plaintext_size)
        if blob.big.partial.parent == self._cache.root:
            try:
                await asyncio.to_thread(self._cache.commit, blob.big, folder, name, blob.small)
            except LoaderError as exc:
                log.warning("uploaded %s/%s, but could not cache it: %s", folder, name, exc.message)

    async def _open_spool(self) -> CacheWrite:
        try:
            return await asyncio.to_thread(self._cache.begin)
        except OSError as exc:
            self._warn_cache(exc)
            return await asyncio.to_thread(spool_elsewhere)

    # Load

    async def open(self, folder: str, name: str) -> Plaintext:
        """The decrypted resource, its size known before the first byte."""
        self.require_login()
        key = key_from_fragment(await self._api.fetch_resource_fragment())
        small = await self._api.fetch_small_part(folder, name)

        try:
            cached = await self._from_cache(key, small, folder, name)
        except DecryptionFailed:
            log.warning(
                "the cached big part of %s/%s does not decrypt with the API's small part: "
                "stale, fetching it again",
                folder,
                name,
            )
            cached = None
        if cached is not None:
            return cached
        for _ in range(2):  # the fresh entry may be removed by someone before we open it
            if not await self._download(folder, name, small):
                break  # the cache cannot be written
            try:
                cached = await self._from_cache(key, small, folder, name)
            except DecryptionFailed:
                await asyncio.to_thread(self._cache.discard, folder, name)
                raise DecryptionFailed(
                    f"{folder}/{name} does not decrypt: its parts on the API and the CDN do "
                    "not match, or the key has changed"
                ) from None
            if cached is not None:
                return cached
        # No cache to hold it: straight from the CDN.
        total, tail = await self._api.big_part_tail(folder, name)
        size = plaintext_size(key, len(small) + total, (small + tail)[-TAIL:])
        return Plaintext(size, _decrypt_stream(key, small, self._api, folder, name))

    async def _from_cache(
        self, key: bytes, small: bytes, folder: str, name: str
    ) -> Plaintext | None:
        """The cache entry's plaintext; None when there is none for this small part, and
        DecryptionFailed when the entry cannot be used with it."""
        entry = await asyncio.to_thread(self._cache.open, folder, name, small)
        if entry is None:
            return None
        try:
            size = await asyncio.to_thread(_cached_plaintext_size, key, small, entry)
        except (DecryptionFailed, OSError):
            entry.file.close()
            raise DecryptionFailed(f"the cached big part of {folder}/{name} is unusable") from None
        chunks = self._decrypt_entry(key, small, entry, folder, name)
        return Plaintext(size, chunks, entry.file.close)

    async def _download(self, folder: str, name: str, small: bytes) -> bool:
        """The big part, fetched into the cache once however many callers want it at once;
        False when the cache cannot be written."""
        key = (folder, name)
        task = self._downloads.get(key)
        if task is None:
            task = asyncio.create_task(self._fetch_into_cache(folder, name, small))
            self._downloads[key] = task
            task.add_done_callback(lambda _: self._downloads.pop(key, None))
        # A caller that hangs up must not cancel the download the others wait for.
        return await asyncio.shield(task)

    async def _fetch_into_cache(self, folder: str, name: str, small: bytes) -> bool:
        try:
            write = await asyncio.to_thread(self._cache.begin)
        except OSError as exc:
            self._warn_cache(exc)
            return False
        try:
            pending = bytearray()
            async for chunk in self._api.stream_big_part(folder, name):
                pending += chunk
                if len(pending) >= CHUNK:
                    await asyncio.to_thread(write.write, bytes(pending))
                    pending.clear()
            await asyncio.to_thread(write.write, bytes(pending))
            await asyncio.to_thread(self._cache.commit, write, folder, name, small)
        except BaseException:
            await asyncio.to_thread(write.abort)
            raise
        log.info("cached %s/%s.big (%d bytes)", folder, name, write.size)
        return True

    async def _decrypt_entry(
        self, key: bytes, small: bytes, entry: CacheEntry, folder: str, name: str
    ) -> AsyncGenerator[bytes, None]:
        """The plaintext of `small || entry`; the last block is held back until the entry's
        digest checks out, so a caller never gets the whole of a damaged one."""
        decryptor = Decryptor(key)
        digest = hashlib.sha256()

        def next_piece() -> bytes | None:
            data = entry.file.read(LOAD_PIECE)
            if not data:
                return None
            digest.update(data)
            return decryptor.update(data)

        ahead: asyncio.Future[bytes | None] | None = None
        try:
            yield decryptor.update(small)
            # One piece ahead: a worker reads and decrypts the next while this one is sent.
            ahead = asyncio.ensure_future(asyncio.to_thread(next_piece))
            while (piece := await ahead) is not None:
                ahead = asyncio.ensure_future(asyncio.to_thread(next_piece))
                yield piece
            if entry.digest is not None and digest.digest() != entry.digest:
                await asyncio.to_thread(self._cache.discard, folder, name)
                raise DecryptionFailed(
                    f"the cached big part of {folder}/{name} is damaged: removed, load it again"
                )
            yield decryptor.finalize()
        finally:
            if ahead is not None:  # the worker may still be reading: let it finish first
                with contextlib.suppress(Exception):
                    await ahead
            entry.file.close()

    def _warn_cache(self, exc: OSError) -> None:
        if not self._cache_warned:
            self._cache_warned = True
            log.warning(
                "the model cache %s cannot be written (%s): resources stream from the CDN uncached",
                self._cache.root,
                exc.strerror,
            )


class _Cutter:
    """Encrypts batches and cuts the blob: the first SMALL_PART_MAX bytes stay in memory
    until the blob is long enough for the cut to be certain; the rest goes to the spool.
    Used by one worker at a time."""

    def __init__(self, encryptor: Encryptor, spool: CacheWrite) -> None:
        self._encryptor = encryptor
        self._spool = spool
        self._head = bytearray()
        self._cut_known = False

    def feed(self, plaintext: list[bytes]) -> None:
        self._take(self._encryptor.update(b"".join(plaintext)))

    def finish(self, plaintext: list[bytes]) -> bytes:
        """The last plaintext; returns the small part, with the big part spooled."""
        self._take(self._encryptor.update(b"".join(plaintext)) + self._encryptor.finalize())
        if not self._cut_known:
            blob = bytes(self._head)
            cut = small_part_size(len(blob))
            self._spool.write(blob[cut:])
            self._head = bytearray(blob[:cut])
        self._spool.flush()
        return bytes(self._head)

    def _take(self, ciphertext: bytes) -> None:
        if self._cut_known:
            self._spool.write(ciphertext)
            return
        self._head += ciphertext
        if len(self._head) >= _FULL_CUT_FROM:
            self._cut_known = True
            self._spool.write(bytes(self._head[SMALL_PART_MAX:]))
            del self._head[SMALL_PART_MAX:]


def _cached_plaintext_size(key: bytes, small: bytes, entry: CacheEntry) -> int:
    if entry.size >= TAIL:
        entry.file.seek(entry.size - TAIL)
        tail = entry.file.read(TAIL)
    else:
        entry.file.seek(0)
        tail = (small + entry.file.read())[-TAIL:]
    entry.file.seek(0)
    return plaintext_size(key, len(small) + entry.size, tail)


async def _decrypt_stream(
    key: bytes, small: bytes, api: ResourceAPI, folder: str, name: str
) -> AsyncGenerator[bytes, None]:
    decryptor = Decryptor(key)
    yield decryptor.update(small)
    async for chunk in api.stream_big_part(folder, name):
        yield decryptor.update(chunk)
    yield decryptor.finalize()
