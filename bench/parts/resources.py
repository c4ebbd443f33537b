"""Rows 5-7: /load from the cache and from the CDN, /upload, and one upload-then-load check."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from bench import client
from bench.fixtures import (
    EMAIL,
    FOLDER,
    PASSWORD,
    RESOURCE_FRAGMENT,
    RESOURCE_NAME,
    WARMUP_NAME,
    Bench,
    Daemon,
)
from bench.harness import MB, BenchError, Spread, warm
from bench.results import PartResult, Row, ratio, runs
from loader import resources
from loader.crypto import Decryptor, Encryptor, key_from_fragment
from tests.emulator.storage import PartStore

# loader.routes reads an upload's body in pieces of this size.
UPLOAD_CHUNK = 256 * 1024
WARMUP_SIZE = 64 * 1024


def _fresh_daemon(bench: Bench) -> Daemon:
    """A new daemon, logged in, that has uploaded or loaded a tiny resource once (so that
    the timed transfer does not pay for first imports and first connections)."""
    bench.emulator_url()
    daemon = bench.daemon()
    try:
        asyncio.run(client.login(daemon.socket, EMAIL, PASSWORD))
        tiny = bench.work / WARMUP_NAME
        if WARMUP_NAME not in bench.uploaded:
            tiny.write_bytes(bytes(range(256)) * (WARMUP_SIZE // 256))
            asyncio.run(client.upload(daemon.socket, FOLDER, WARMUP_NAME, tiny))
            bench.uploaded.add(WARMUP_NAME)
        asyncio.run(client.load(daemon.socket, FOLDER, WARMUP_NAME))
    except BaseException:
        daemon.stop()
        raise
    return daemon


def _cache_entry(bench: Bench) -> Path:
    return bench.models / FOLDER / f"{RESOURCE_NAME}.big"


def _ensure_uploaded(bench: Bench) -> None:
    if RESOURCE_NAME in bench.uploaded and _cache_entry(bench).exists():
        return
    resource = bench.resource()
    daemon = _fresh_daemon(bench)
    try:
        asyncio.run(client.upload(daemon.socket, FOLDER, RESOURCE_NAME, resource.path))
    finally:
        daemon.stop()
    bench.uploaded.add(RESOURCE_NAME)


def encrypt_file(path: Path, key: bytes) -> float:
    """Seconds to read `path` in upload-sized pieces and encrypt it, output discarded."""
    started = time.perf_counter()
    encryptor = Encryptor(key)
    with open(path, "rb", buffering=0) as source:
        while piece := source.read(UPLOAD_CHUNK):
            encryptor.update(piece)
    encryptor.finalize()
    return time.perf_counter() - started


def decrypt_blob(small: bytes, big: Path, key: bytes) -> float:
    """Seconds to decrypt small || big as the daemon does (big read in its BIG_PART_IO pieces)."""
    started = time.perf_counter()
    decryptor = Decryptor(key)
    decryptor.update(small)
    with open(big, "rb", buffering=0) as source:
        while piece := source.read(resources.BIG_PART_IO):
            decryptor.update(piece)
    decryptor.finalize()
    return time.perf_counter() - started


def _timed_load(bench: Bench) -> tuple[float, float]:
    """(MB/s, the daemon's peak RSS) of one /load of the resource by a fresh daemon."""
    size = bench.resource().size
    daemon = _fresh_daemon(bench)
    try:
        bench.settle()
        done = asyncio.run(client.load(daemon.socket, FOLDER, RESOURCE_NAME))
        peak = daemon.peak_rss_mb()
    finally:
        daemon.stop()
    if done.size != size:
        raise BenchError(f"/load sent {done.size} bytes, not {size}")
    return size / MB / done.seconds, peak


def load_cached(bench: Bench) -> PartResult:
    """Row 5: /load with the big part in the cache, against decrypting the blob alone."""
    resource = bench.resource()
    _ensure_uploaded(bench)
    entry = _cache_entry(bench)
    store = PartStore(bench.emulator_storage)
    small = store.small_path(FOLDER, RESOURCE_NAME).read_bytes()
    # The same bytes as the cache entry, without its trailer.
    big = store.big_path(FOLDER, RESOURCE_NAME)
    key = key_from_fragment(RESOURCE_FRAGMENT)
    warm(entry, big)
    speeds: list[float] = []
    peaks: list[float] = []
    alone: list[float] = []
    for _ in range(bench.runs):
        mb_s, peak = _timed_load(bench)
        speeds.append(mb_s)
        peaks.append(peak)
        bench.settle()
        alone.append(resource.size / MB / decrypt_blob(small, big, key))
        print(f"  /load cached: {mb_s:,.0f} MB/s, peak RSS {peak:.1f} MB")
    speed, rss, ref = Spread.of(speeds), Spread.of(peaks), Spread.of(alone)
    size = f"{resource.size / MB:,.0f} MB"
    result = PartResult()
    result.rows += [
        Row(
            "5",
            f"/load, {size} from the cache: through the socket",
            speed.fmt("MB/s", 0),
            f"decryption alone: {ref.fmt('MB/s', 0)}",
            ratio(speed, ref),
            ">= 500 MB/s",
            speed.median >= 500,
            f"{runs(speed, 0)} MB/s; decryption alone {runs(ref, 0)} MB/s",
        ),
        Row(
            "5b",
            "/load from the cache: daemon peak RSS",
            rss.fmt("MB"),
            target="< 80 MB",
            met=rss.hi < 80,
            runs=f"{runs(rss)} MB",
        ),
    ]
    result.notes.append(
        "Rows 5-7: the client is aiohttp in the bench's process over the Unix socket; the "
        "emulator serves the API and the CDN over HTTP on 127.0.0.1; each run has a fresh "
        "daemon that first logged in and moved a 64 KiB resource (first imports and "
        "connections are not timed). MB/s counts plaintext bytes, from the request to the "
        "last byte of the answer."
    )
    return result


def load_cdn(bench: Bench) -> PartResult:
    """Row 6: /load with the cache entry deleted first: the daemon fetches it from the CDN."""
    resource = bench.resource()
    _ensure_uploaded(bench)
    entry = _cache_entry(bench)
    speeds: list[float] = []
    peaks: list[float] = []
    for _ in range(bench.runs):
        entry.unlink(missing_ok=True)
        mb_s, peak = _timed_load(bench)
        if not entry.exists():
            raise BenchError("the load from the CDN did not fill the cache")
        speeds.append(mb_s)
        peaks.append(peak)
        print(f"  /load from the CDN: {mb_s:,.0f} MB/s, peak RSS {peak:.1f} MB")
    speed, rss = Spread.of(speeds), Spread.of(peaks)
    result = PartResult()
    result.rows += [
        Row(
            "6",
            f"/load, {resource.size / MB:,.0f} MB from the CDN (cache entry deleted first)",
            speed.fmt("MB/s", 0),
            runs=f"{runs(speed, 0)} MB/s",
        ),
        Row(
            "6b",
            "/load from the CDN: daemon peak RSS",
            rss.fmt("MB"),
            target="< 80 MB",
            met=rss.hi < 80,
            runs=f"{runs(rss)} MB",
        ),
    ]
    result.notes.append(
        "Row 6: the daemon downloads the big part into its cache, then decrypts from there "
        "while answering; the time includes both."
    )
    return result


def upload(bench: Bench) -> PartResult:
    """Row 7: /upload (multipart, streamed from a file), against encrypting it alone."""
    resource = bench.resource()
    key = key_from_fragment(RESOURCE_FRAGMENT)
    warm(resource.path)
    speeds: list[float] = []
    peaks: list[float] = []
    alone: list[float] = []
    for _ in range(bench.runs):
        daemon = _fresh_daemon(bench)
        try:
            bench.settle()
            done = asyncio.run(client.upload(daemon.socket, FOLDER, RESOURCE_NAME, resource.path))
            peaks.append(daemon.peak_rss_mb())
        finally:
            daemon.stop()
        bench.uploaded.add(RESOURCE_NAME)
        speeds.append(resource.size / MB / done.seconds)
        bench.settle()
        alone.append(resource.size / MB / encrypt_file(resource.path, key))
        print(f"  /upload: {speeds[-1]:,.0f} MB/s, peak RSS {peaks[-1]:.1f} MB")
    speed, rss, ref = Spread.of(speeds), Spread.of(peaks), Spread.of(alone)
    result = PartResult()
    result.rows += [
        Row(
            "7",
            f"/upload, {resource.size / MB:,.0f} MB multipart: request to answer",
            speed.fmt("MB/s", 0),
            f"encryption alone: {ref.fmt('MB/s', 0)}",
            ratio(speed, ref),
            ">= 200 MB/s",
            speed.median >= 200,
            f"{runs(speed, 0)} MB/s; encryption alone {runs(ref, 0)} MB/s",
        ),
        Row(
            "7b",
            "/upload: daemon peak RSS",
            rss.fmt("MB"),
            target="< 80 MB",
            met=rss.hi < 80,
            runs=f"{runs(rss)} MB",
        ),
    ]
    result.notes.append(
        "Row 7: the answer comes after the daemon has encrypted and spooled the body, sent "
        "the big part to the CDN and the small part to the API, and committed (fsync) the "
        "big part to its cache; all of that is in the time."
    )
    return result


def roundtrip(bench: Bench) -> PartResult:
    """Row 7c: upload then load the resource with one daemon; the bytes must be identical."""
    resource = bench.resource()
    daemon = _fresh_daemon(bench)
    try:
        asyncio.run(client.upload(daemon.socket, FOLDER, RESOURCE_NAME, resource.path))
        bench.uploaded.add(RESOURCE_NAME)
        done = asyncio.run(client.load(daemon.socket, FOLDER, RESOURCE_NAME, digest=True))
        peak = daemon.peak_rss_mb()
    finally:
        daemon.stop()
    same = done.sha256 == resource.sha256 and done.size == resource.size
    result = PartResult()
    result.rows.append(
        Row(
            "7c",
            f"upload then load {resource.size / MB:,.0f} MB: identical bytes; peak RSS over both",
            f"{'identical' if same else 'DIFFERENT'} (sha256); {peak:.1f} MB",
            target="identical; < 80 MB",
            met=same and peak < 80,
            runs=f"sha256 sent {resource.sha256}, got {done.sha256}",
        )
    )
    return result
