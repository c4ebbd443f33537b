"""The daemon's local API as the bench drives it: aiohttp over the Unix socket."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.harness import BenchError

BASE = "http://loader"
READ_CHUNK = 1 << 20
# What the client reads of the file at a time, as `azaion-loader upload` does.
UPLOAD_READ = 1 << 20


def session(socket: Path, limit: int = 8) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.UnixConnector(path=str(socket), limit=limit),
        timeout=aiohttp.ClientTimeout(total=None, sock_read=600),
    )


async def _ok(resp: aiohttp.ClientResponse, what: str) -> Any:
    body = await resp.read()
    if resp.status != 200:
        raise BenchError(f"{what} answered {resp.status}: {body[:300]!r}")
    return await resp.json() if body else None


async def login(socket: Path, email: str, password: str) -> None:
    async with session(socket) as http:
        resp = await http.post(f"{BASE}/login", json={"email": email, "password": password})
        await _ok(resp, "/login")


@dataclass
class UnlockRun:
    """One unlock as seen through /unlock/status: times are perf_counter seconds."""

    started: float
    started_monotonic: float  # the same moment on time.monotonic(), shared by processes
    wall: float = 0.0
    # (seconds since POST /unlock, bytesDone, state) at every poll
    trace: list[tuple[float, int, str]] = field(default_factory=list)
    # (seconds since POST /unlock, percent) at every poll
    percents: list[tuple[float, float]] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)


async def drive_unlock(
    socket: Path, email: str, password: str, interval: float, timeout: float = 900.0
) -> UnlockRun:
    """POST /unlock, then poll /unlock/status every `interval` s until ready (BenchError on
    error or timeout). The wall time ends at the first poll that sees the state ready."""
    async with session(socket) as http:
        run = UnlockRun(started=time.perf_counter(), started_monotonic=time.monotonic())
        resp = await http.post(f"{BASE}/unlock", json={"email": email, "password": password})
        await _ok(resp, "/unlock")
        deadline = run.started + timeout
        next_poll = run.started
        while True:
            resp = await http.get(f"{BASE}/unlock/status")
            status = await _ok(resp, "/unlock/status")
            now = time.perf_counter()
            run.trace.append((now - run.started, int(status["bytesDone"]), str(status["state"])))
            run.percents.append((now - run.started, float(status.get("percent") or 0)))
            run.status = status
            if status["state"] == "ready":
                run.wall = now - run.started
                return run
            if status["state"] == "error":
                raise BenchError(f"the unlock failed: {status['error']}")
            if now > deadline:
                raise BenchError(f"the unlock did not finish in {timeout} s: {status}")
            next_poll += interval
            await asyncio.sleep(max(0.0, next_poll - time.perf_counter()))


@dataclass(frozen=True)
class Transfer:
    seconds: float
    size: int
    sha256: str | None = None


async def load(socket: Path, folder: str, name: str, *, digest: bool = False) -> Transfer:
    """POST /load/NAME and read the whole body (hashing it if asked), discarding it."""
    sha = hashlib.sha256() if digest else None
    size = 0
    async with session(socket) as http:
        started = time.perf_counter()
        resp = await http.post(f"{BASE}/load/{name}", json={"filename": name, "folder": folder})
        if resp.status != 200:
            raise BenchError(f"/load answered {resp.status}: {(await resp.read())[:300]!r}")
        async for chunk in resp.content.iter_chunked(READ_CHUNK):
            size += len(chunk)
            if sha is not None:
                sha.update(chunk)
        seconds = time.perf_counter() - started
    if resp.content_length is not None and size != resp.content_length:
        raise BenchError(f"/load sent {size} bytes of the {resp.content_length} announced")
    return Transfer(seconds, size, sha.hexdigest() if sha else None)


async def upload(socket: Path, folder: str, name: str, path: Path) -> Transfer:
    """POST /upload/NAME as multipart, the file read in 1 MiB pieces as the CLI sends it."""
    size = (await asyncio.to_thread(path.stat)).st_size
    file = await asyncio.to_thread(open, path, "rb")

    async def pieces() -> AsyncIterator[bytes]:
        while piece := await asyncio.to_thread(file.read, UPLOAD_READ):
            yield piece

    try:
        async with session(socket) as http:
            form = aiohttp.MultipartWriter("form-data")
            form.append(folder).set_content_disposition("form-data", name="folder")
            form.append(
                pieces(), {"Content-Type": "application/octet-stream"}
            ).set_content_disposition("form-data", name="data", filename=name)
            started = time.perf_counter()
            resp = await http.post(f"{BASE}/upload/{name}", data=form)
            await _ok(resp, "/upload")
            seconds = time.perf_counter() - started
    finally:
        file.close()
    return Transfer(seconds, size)
