"""Resources (AI models): the big/small split of resource-api.md, both ways, and the cache.

Upload (the workflow is `uploads.Upload`): encrypt with a fresh IV while reading the
caller's body, spool the ciphertext (never the plaintext), send the big part to the CDN,
then the small part and the integrity record to the API, and keep the big part in the cache.

Load: small part and integrity record from the API, big part from the cache or the CDN,
checked against the record before the caller has the last byte and before it is cached;
decrypt `small || big` while streaming it to the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass

from loader.cache import CacheEntry, CacheWrite, EntryDigests, ModelCache, spool_elsewhere
from loader.crypto import (
    Decryptor,
    key_from_fragment,
    plaintext_size,
)
from loader.errors import (
    DecryptionFailed,
    IntegrityFailed,
    IntegrityMissing,
    InvalidName,
    LoaderError,
    NotAuthenticated,
)
from loader.integrity import RECORD_SUFFIX, IntegrityRecord
from loader.metrics import Metrics
from loader.remote import TAIL, ResourceAPI
from loader.settings import Settings
from loader.uploads import Upload

log = logging.getLogger(__name__)

# resource-api.md, "Names": a letter or digit, then letters, digits, '.', '_' or '-'.
NAME_MAX = 255


def name_pattern(longest: int) -> str:
    return rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{longest - 1}}}"


_NAME = re.compile(name_pattern(NAME_MAX))
# The record's name, NAME.integrity, must obey the same rule.
MAX_RESOURCE_NAME = NAME_MAX - len(RECORD_SUFFIX)
# Reads and writes of big parts go to a worker thread in pieces of this size.
BIG_PART_IO = 1024 * 1024
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


def check_resource_name(value: str) -> str:
    """`value` if it may name a user's resource: a valid name that leaves room for, and is
    not, the name of an integrity record."""
    name = check_name("resource name", value)
    if name.endswith(RECORD_SUFFIX):
        raise InvalidName(
            f"invalid resource name {name[:64]!r}: names ending in '{RECORD_SUFFIX}' are kept "
            "for the API's integrity records"
        )
    if len(name) > MAX_RESOURCE_NAME:
        raise InvalidName(
            f"invalid resource name {name[:64] + '...'!r}: use at most {MAX_RESOURCE_NAME} "
            f"characters, so that its integrity record's name (NAME{RECORD_SUFFIX}) fits too"
        )
    return name


@dataclass
class Plaintext:
    """A decrypted resource on its way to the caller: its exact size, then its bytes."""

    size: int
    chunks: AsyncGenerator[bytes, None]
    # Releases what `chunks` holds should it never be iterated.
    close: Callable[[], None] = lambda: None


@dataclass(frozen=True)
class _Wanted:
    """What a load knows of the blob before its big part: the fresh small part and the
    API's integrity record (None for a resource uploaded before records existed)."""

    folder: str
    name: str
    small: bytes
    record: IntegrityRecord | None

    @property
    def big_size(self) -> int | None:
        return None if self.record is None else self.record.size - len(self.small)

    def matches(self, digests: EntryDigests, big_size: int) -> bool:
        """Whether a cache entry is this blob's big part, by what it recorded."""
        if digests.small != hashlib.sha256(self.small).digest():
            return False
        if self.record is None:
            return True
        return digests.blob == self.record.sha256 and big_size == self.big_size

    def check_size(self, big_size: int) -> None:
        if self.big_size is not None and big_size != self.big_size:
            raise self.mismatch()

    def check(self, blob_digest: bytes, big_size: int) -> None:
        """IntegrityFailed unless `small || big` is the blob the record vouches for."""
        self.check_size(big_size)
        if self.record is not None and blob_digest != self.record.sha256:
            raise self.mismatch()

    def mismatch(self) -> IntegrityFailed:
        return IntegrityFailed(
            f"the big part of {self.folder}/{self.name} from the CDN does not match the API's "
            "integrity record: it was altered or damaged on its way, or an upload of it did "
            "not finish; not served, not cached"
        )


class Resources:
    def __init__(
        self,
        settings: Settings,
        api: ResourceAPI,
        cache: ModelCache,
        metrics: Metrics | None = None,
    ) -> None:
        self._settings = settings
        self._api = api
        self._cache = cache
        self._metrics = metrics or Metrics()
        self._downloads: dict[tuple[str, str], asyncio.Task[bool]] = {}
        self._cache_warned = False

    def require_login(self) -> None:
        if not self._api.authenticated:
            raise NotAuthenticated("not logged in: call /login with the Resource API credentials")

    # Upload

    async def receive_upload(
        self,
        chunks: AsyncIterator[bytes],
        *,
        target: tuple[str, str] | None = None,
        declared: int | None = None,
    ) -> Upload:
        """Encrypt the caller's plaintext into a spool as it arrives; with `target` (folder
        and name) known, its big part goes to the CDN meanwhile. `declared` is the size the
        caller announced for the file, if any. The caller must `discard` the result."""
        self.require_login()
        key = key_from_fragment(await self._api.fetch_resource_fragment())
        spool = await self._open_spool()
        limit = self._settings.max_upload_bytes
        upload = Upload(self._api, key, spool, limit, target=target, declared=declared)
        try:
            await upload.receive(chunks)
        except BaseException:
            await upload.discard()
            raise
        return upload

    async def publish(self, folder: str, name: str, upload: Upload) -> None:
        """Make the received upload the resource `folder/name`, and keep its big part in the
        cache."""
        blob = await upload.publish(folder, name)
        log.info("uploaded %s/%s (%d bytes)", folder, name, blob.plaintext_size)
        self._metrics.resource_uploaded(blob.plaintext_size)
        if blob.big.partial.parent == self._cache.root:
            try:
                await asyncio.to_thread(self._cache.commit, blob.big, folder, name)
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
        wanted = await self._wanted(folder, name)
        cached = await self._from_cache(key, wanted, fresh=False)
        if cached is not None:
            self._metrics.resource_loaded("cache", cached.size)
            return cached
        plaintext = await self._from_cdn(key, wanted)
        self._metrics.resource_loaded("cdn", plaintext.size)
        return plaintext

    async def _from_cdn(self, key: bytes, wanted: _Wanted) -> Plaintext:
        """The big part fetched into the cache, then served from there; or streamed."""
        for _ in range(2):  # the fresh entry may be removed by someone before we open it
            if not await self._download(wanted):
                break  # the cache cannot be written
            cached = await self._from_cache(key, wanted, fresh=True)
            if cached is not None:
                return cached
        # No cache to hold it: straight from the CDN, checked on the way.
        total, tail = await self._api.big_part_tail(wanted.folder, wanted.name)
        wanted.check_size(total)
        size = plaintext_size(key, len(wanted.small) + total, (wanted.small + tail)[-TAIL:])
        return Plaintext(size, _decrypt_stream(key, wanted, self._api))

    async def _wanted(self, folder: str, name: str) -> _Wanted:
        """The small part and the integrity record, asked for side by side."""
        fetching = asyncio.ensure_future(self._api.fetch_integrity_record(folder, name))
        try:
            small = await self._api.fetch_small_part(folder, name)
            raw = await fetching
        finally:
            fetching.cancel()
            await asyncio.gather(fetching, return_exceptions=True)
        if raw is not None:
            return _Wanted(folder, name, small, IntegrityRecord.parse(raw, f"{folder}/{name}"))
        if self._settings.require_integrity:
            raise IntegrityMissing(
                f"{folder}/{name} has no integrity record on the API, and REQUIRE_INTEGRITY=1 "
                "refuses a resource that nothing vouches for"
            )
        log.warning(
            "%s/%s has no integrity record on the API (uploaded before records existed): "
            "serving it unverified",
            folder,
            name,
        )
        return _Wanted(folder, name, small, None)

    async def _from_cache(self, key: bytes, wanted: _Wanted, *, fresh: bool) -> Plaintext | None:
        """The cache entry's plaintext; None when there is no usable entry of this blob.
        An entry that is this blob's yet does not decrypt was damaged on disk, unless it is
        `fresh` from the CDN: then the key is wrong (DecryptionFailed)."""
        folder, name = wanted.folder, wanted.name
        entry = await asyncio.to_thread(self._cache.open, folder, name)
        if entry is None:
            return None
        if not wanted.matches(entry.digests, entry.size):
            entry.file.close()
            log.info("cached %s/%s.big belongs to another upload: fetching it again", folder, name)
            return None
        try:
            size = await asyncio.to_thread(_cached_plaintext_size, key, wanted.small, entry)
        except (DecryptionFailed, OSError):
            entry.file.close()
            await asyncio.to_thread(self._cache.discard, folder, name)
            if fresh:
                raise DecryptionFailed(
                    f"{folder}/{name} does not decrypt: its parts on the API and the CDN do "
                    "not match, or the key has changed"
                ) from None
            log.warning("cached %s/%s.big is damaged: fetching it again", folder, name)
            return None
        chunks = self._decrypt_entry(key, wanted, entry)
        return Plaintext(size, chunks, entry.file.close)

    async def _download(self, wanted: _Wanted) -> bool:
        """The big part, fetched into the cache once however many callers want it at once;
        False when the cache cannot be written."""
        key = (wanted.folder, wanted.name)
        task = self._downloads.get(key)
        if task is None:
            task = asyncio.create_task(self._fetch_into_cache(wanted))
            self._downloads[key] = task
            task.add_done_callback(self._download_done)
        # A caller that hangs up must not cancel the download the others wait for.
        return await asyncio.shield(task)

    def _download_done(self, task: asyncio.Task[bool]) -> None:
        for key, running in list(self._downloads.items()):
            if running is task:
                del self._downloads[key]
        if not task.cancelled():
            task.exception()  # retrieved: every caller may have gone, and their errors with them

    async def close(self) -> None:
        """At shutdown: cancel the downloads still running, and wait until they cleaned up."""
        tasks = list(self._downloads.values())
        for (folder, name), task in self._downloads.items():
            log.info("stopping the download of %s/%s.big: the daemon shuts down", folder, name)
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _fetch_into_cache(self, wanted: _Wanted) -> bool:
        folder, name = wanted.folder, wanted.name
        try:
            write = await asyncio.to_thread(self._cache.begin)
        except OSError as exc:
            self._warn_cache(exc)
            return False
        write.join(wanted.small)
        try:
            pending = bytearray()
            async for chunk in self._api.stream_big_part(folder, name):
                pending += chunk
                if wanted.big_size is not None and write.size + len(pending) > wanted.big_size:
                    raise wanted.mismatch()  # longer than the record says: no need to go on
                if len(pending) >= BIG_PART_IO:
                    await asyncio.to_thread(write.write, bytes(pending))
                    pending.clear()
            await asyncio.to_thread(write.write, bytes(pending))
            try:
                wanted.check(write.blob_digest, write.size)
            except IntegrityFailed:
                await asyncio.to_thread(self._cache.discard, folder, name)
                raise
            await asyncio.to_thread(self._cache.commit, write, folder, name)
        except BaseException:
            await asyncio.to_thread(write.abort)
            raise
        log.info("cached %s/%s.big (%d bytes)", folder, name, write.size)
        return True

    async def _decrypt_entry(
        self, key: bytes, wanted: _Wanted, entry: CacheEntry
    ) -> AsyncGenerator[bytes, None]:
        """The plaintext of `small || entry`; the last block is held back until the blob's
        digest is the one recorded, so a caller never gets the whole of a damaged entry."""
        decryptor = Decryptor(key)
        digest = hashlib.sha256(wanted.small)
        left = entry.size

        def next_piece() -> bytes | None:
            nonlocal left
            data = entry.file.read(min(LOAD_PIECE, left))
            if not data:
                return None
            left -= len(data)
            digest.update(data)
            return decryptor.update(data)

        ahead: asyncio.Future[bytes | None] | None = None
        try:
            yield decryptor.update(wanted.small)
            # One piece ahead: a worker reads and decrypts the next while this one is sent.
            ahead = asyncio.ensure_future(asyncio.to_thread(next_piece))
            while (piece := await ahead) is not None:
                ahead = asyncio.ensure_future(asyncio.to_thread(next_piece))
                yield piece
            if left or digest.digest() != entry.digests.blob:
                await asyncio.to_thread(self._cache.discard, wanted.folder, wanted.name)
                raise IntegrityFailed(
                    f"the cached big part of {wanted.folder}/{wanted.name} is damaged: "
                    "removed, load it again"
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


def _cached_plaintext_size(key: bytes, small: bytes, entry: CacheEntry) -> int:
    if entry.size >= TAIL:
        entry.file.seek(entry.size - TAIL)
        tail = entry.file.read(TAIL)
    else:
        entry.file.seek(0)
        tail = (small + entry.file.read(entry.size))[-TAIL:]
    entry.file.seek(0)
    return plaintext_size(key, len(small) + entry.size, tail)


async def _decrypt_stream(
    key: bytes, wanted: _Wanted, api: ResourceAPI
) -> AsyncGenerator[bytes, None]:
    """`small || big` from the CDN, decrypted; the last block only once the blob checks out."""
    decryptor = Decryptor(key)
    digest = hashlib.sha256(wanted.small)
    size = 0
    yield decryptor.update(wanted.small)
    async for chunk in api.stream_big_part(wanted.folder, wanted.name):
        digest.update(chunk)
        size += len(chunk)
        yield decryptor.update(chunk)
    wanted.check(digest.digest(), size)
    yield decryptor.finalize()
