"""Responses that can be spoiled on purpose: a body cut short, a lying Content-Length,
a connection closed instead of an answer, file bytes altered in transit."""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import BinaryIO, Literal, NamedTuple, NoReturn

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

Spoilage = Literal["truncate", "wrong-length"]
Tampering = Literal["flip-bit", "swap-blocks"]
OnSent = Callable[[int, bool], None]
Reader = Callable[[int], Awaitable[bytes]]

_BYTE_RANGE = re.compile(r"\s*bytes\s*=\s*([0-9]*)\s*-\s*([0-9]*)\s*", re.IGNORECASE)
_CHUNK = 1 << 18
_BLOCK = 16  # what swap-blocks swaps: an AES block
JSON = "application/json"
OCTETS = "application/octet-stream"


class ByteRange(NamedTuple):
    start: int
    stop: int  # exclusive


class Patch(NamedTuple):
    """Bytes sent in place of the file's own from absolute offset ``start`` on."""

    start: int
    data: bytes

    def apply(self, chunk: bytes, position: int) -> bytes:
        """``chunk``, which holds the file's bytes from ``position`` on, with the patch."""
        low = max(self.start, position)
        high = min(self.start + len(self.data), position + len(chunk))
        if low >= high:
            return chunk
        patched = bytearray(chunk)
        patched[low - position : high - position] = self.data[low - self.start : high - self.start]
        return bytes(patched)


class RangeNotSatisfiable(ValueError):
    """A Range that asks only for bytes past the end."""


def parse_byte_range(header: str | None, size: int) -> ByteRange | None:
    """The single byte range asked for, or None to send everything (RFC 9110 §14.2).

    A header this server does not understand, including several ranges, is
    ignored as the RFC allows; only a well-formed range past the end is refused.
    """
    match = _BYTE_RANGE.fullmatch(header or "")
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # suffix range: the last N bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(header)
        return ByteRange(max(0, size - suffix), size)
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable(header)
    stop = size if not last else min(int(last) + 1, size)
    return ByteRange(start, stop)


def hang_up(request: web.BaseRequest) -> NoReturn:
    """Close the connection and tell aiohttp so, which it takes quietly."""
    transport = request.transport
    if transport is not None:
        # close(), not abort(): what was already written still reaches the client.
        transport.close()
    raise ConnectionResetError("connection closed by the emulator")


class HangUp(web.StreamResponse):
    """Stands in for an answer that is never given."""

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        hang_up(request)


class EmulatedResponse(web.StreamResponse):
    """A response whose body the fault middleware may spoil before it is sent."""

    def __init__(
        self,
        *,
        status: int = 200,
        content_type: str = OCTETS,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(status=status, headers=headers)
        self.content_type = content_type
        self.spoilage: Spoilage | None = None
        self.truncate_at: int | None = None
        self.honour_range = True
        self.body_sent = 0

    def spoil(self, spoilage: Spoilage, truncate_at: int | None = None) -> None:
        self.spoilage = spoilage
        self.truncate_at = truncate_at

    async def _send(
        self, request: web.BaseRequest, length: int, read: Reader
    ) -> tuple[AbstractStreamWriter | None, int]:
        """Send the headers and up to ``length`` bytes from ``read``.

        Returns the writer and the number of body bytes sent.
        """
        limit = length
        declared = length
        if self.spoilage == "truncate":
            limit = min(length, length // 2 if self.truncate_at is None else self.truncate_at)
        elif self.spoilage == "wrong-length":
            declared = length + 1
        if request.method == "HEAD":
            limit = 0
        self.content_length = declared
        writer = await super().prepare(request)
        while self.body_sent < limit:
            chunk = await read(min(_CHUNK, limit - self.body_sent))
            if not chunk:
                break
            await self.write(chunk)
            self.body_sent += len(chunk)
        return writer, self.body_sent

    def _finish(self, request: web.BaseRequest) -> None:
        """Once a spoiled body is out, close the connection so the client sees it short."""
        if self.spoilage is not None:
            hang_up(request)

    async def _send_bytes(
        self, request: web.BaseRequest, body: bytes
    ) -> AbstractStreamWriter | None:
        writer, _ = await self._send(request, len(body), _memory_reader(body))
        self._finish(request)
        return writer


class BytesResponse(EmulatedResponse):
    """A body held in memory."""

    def __init__(
        self,
        body: bytes,
        *,
        status: int = 200,
        content_type: str = OCTETS,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(status=status, content_type=content_type, headers=headers)
        self._payload = body

    @classmethod
    def json(
        cls, data: object, *, status: int = 200, headers: Mapping[str, str] | None = None
    ) -> BytesResponse:
        return cls(json.dumps(data).encode(), status=status, content_type=JSON, headers=headers)

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return await super().prepare(request)
        return await self._send_bytes(request, self._payload)


class FilePartResponse(EmulatedResponse):
    """A file streamed from disk, honouring a single byte ``Range``.

    The file is opened only here, when the answer is sent, so an answer never
    sent leaves no file open. ``on_sent(bytes_sent, complete)`` is told how a
    GET's body went.
    """

    def __init__(self, path: Path, on_sent: OnSent) -> None:
        super().__init__(headers={"Accept-Ranges": "bytes"})
        self._path = path
        self._on_sent = on_sent
        self._tampering: tuple[Tampering, int | None] | None = None

    def tamper(self, tampering: Tampering, offset: int | None) -> None:
        """Alter the bytes sent around file offset ``offset`` (None: the middle).

        The patch is worked out only in prepare(), once the file's size is known.
        """
        self._tampering = (tampering, offset)

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return await super().prepare(request)
        loop = asyncio.get_running_loop()
        try:
            file, size = await loop.run_in_executor(None, _open_with_size, self._path)
        except FileNotFoundError:
            return await self._answer_instead(request, 404, "no such part")
        try:
            header = request.headers.get("Range") if self.honour_range else None
            try:
                byte_range = parse_byte_range(header, size)
            except RangeNotSatisfiable:
                self.headers["Content-Range"] = f"bytes */{size}"
                return await self._answer_instead(request, 416, "range not satisfiable")
            if byte_range is None:
                byte_range = ByteRange(0, size)
            else:
                self.set_status(206)
                last = byte_range.stop - 1
                self.headers["Content-Range"] = f"bytes {byte_range.start}-{last}/{size}"
            patch = None
            if self._tampering is not None:
                patch = await loop.run_in_executor(None, _patch, file, size, *self._tampering)
            writer = await self._stream(request, file, byte_range, patch)
        finally:
            file.close()
        self._finish(request)
        return writer

    async def _stream(
        self, request: web.BaseRequest, file: BinaryIO, byte_range: ByteRange, patch: Patch | None
    ) -> AbstractStreamWriter | None:
        loop = asyncio.get_running_loop()
        if byte_range.start:
            await loop.run_in_executor(None, file.seek, byte_range.start)

        position = byte_range.start

        async def read(count: int) -> bytes:
            nonlocal position
            chunk = await loop.run_in_executor(None, file.read, count)
            if patch is not None:
                # Absolute positions: a Range, suffix or resumed, shows what a full GET would.
                chunk = patch.apply(chunk, position)
            position += len(chunk)
            return chunk

        length = byte_range.stop - byte_range.start
        complete = False
        try:
            writer, sent = await self._send(request, length, read)
            complete = sent == length and self.spoilage is None
        finally:
            if request.method != "HEAD":  # also when the client left half way
                self._on_sent(self.body_sent, complete)
        return writer

    async def _answer_instead(
        self, request: web.BaseRequest, status: int, detail: str
    ) -> AbstractStreamWriter | None:
        self.set_status(status)
        self.content_type = JSON
        return await self._send_bytes(request, json.dumps({"detail": detail}).encode())


def _memory_reader(data: bytes) -> Reader:
    view = memoryview(data)
    offset = 0

    async def read(size: int) -> bytes:
        nonlocal offset
        chunk = bytes(view[offset : offset + size])
        offset += len(chunk)
        return chunk

    return read


def _patch(file: BinaryIO, size: int, tampering: Tampering, offset: int | None) -> Patch | None:
    """What ``tampering`` sends instead of the file's own bytes; None where it cannot.

    Reads with pread, which leaves the file position to the streaming.
    """
    spot = size // 2 if offset is None else offset
    if tampering == "flip-bit":
        if spot >= size:
            return None
        return Patch(spot, bytes([os.pread(file.fileno(), 1, spot)[0] ^ 1]))
    start = spot - spot % _BLOCK
    if start + 2 * _BLOCK > size:  # no next block: the last two whole ones
        start = size - size % _BLOCK - 2 * _BLOCK
    if start < 0:
        return None
    blocks = os.pread(file.fileno(), 2 * _BLOCK, start)
    return Patch(start, blocks[_BLOCK:] + blocks[:_BLOCK])


def _open_with_size(path: Path) -> tuple[BinaryIO, int]:
    file = path.open("rb")
    try:
        return file, os.fstat(file.fileno()).st_size
    except BaseException:
        file.close()
        raise
