"""The bodies of /load and /upload over the socket: /load's plaintext streamed out with the
transport tuned for it, /upload's multipart form read into the encrypting spool."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from loader.errors import LoaderError, PayloadTooLarge, ValidationFailed
from loader.resources import Plaintext, Resources, check_name
from loader.uploads import Upload

log = logging.getLogger(__name__)

# /load: room for a whole piece in the transport's buffer, and as the socket's send buffer.
_LOAD_BUFFER = 1024 * 1024
# /upload: one read of the file's part; the form's boundaries and headers beyond the file;
# the most a text field may hold.
_UPLOAD_READ = 1024 * 1024
_FORM_OVERHEAD = 64 * 1024
_MAX_FIELD = 4096


async def send_plaintext(
    request: web.Request, plaintext: Plaintext, what: str
) -> web.StreamResponse:
    """Stream `plaintext` as the answer, and close it. Once the status is sent, a failure can
    only cut the body short, which the caller sees against the Content-Length."""
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = plaintext.size
    try:
        await response.prepare(request)
        if request.transport is not None:
            # Room for a whole piece: the next is decrypted while the socket drains. A bigger
            # kernel buffer takes a piece in fewer send() calls (capped by net.core.wmem_max).
            request.transport.set_write_buffer_limits(high=_LOAD_BUFFER)
            sock = request.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _LOAD_BUFFER)
        # The last piece goes with write_eof(), which then waits, with no high-water mark,
        # until every byte has left: a stop right after this handler returns loses nothing.
        # (aiohttp >= 3.9 does not wait when write_eof() is given nothing.)
        last = b""
        async for chunk in plaintext.chunks:
            if chunk:
                if last:
                    await response.write(last)
                last = chunk
        if request.transport is not None:
            request.transport.set_write_buffer_limits(high=0)
        await response.write_eof(last)
    except Exception as exc:
        # The status is sent: all that is left is to cut the body short, which the caller
        # sees against the Content-Length.
        if isinstance(exc, LoaderError):
            log.error("load of %s failed mid-stream: %s", what, exc.message)
        elif not isinstance(exc, ConnectionError):
            log.exception("load of %s failed mid-stream", what)
        if request.transport is not None:
            request.transport.abort()
    finally:
        await plaintext.chunks.aclose()
        plaintext.close()
    return response


@contextlib.asynccontextmanager
async def upload_form(
    request: web.Request, resources: Resources, name: str, limit: int
) -> AsyncIterator[tuple[str, Upload]]:
    """The form's folder and its file, encrypted into a spool as it arrives (its big part on
    its way to the CDN meanwhile when the folder came first); the upload is discarded when the
    block ends, published or not."""
    if request.content_length is not None and request.content_length > limit + _FORM_OVERHEAD:
        raise PayloadTooLarge(f"the upload is larger than MAX_UPLOAD_BYTES ({limit} bytes)")
    if not request.content_type.startswith("multipart/"):
        raise ValidationFailed("body: expected multipart/form-data with fields 'data' and 'folder'")
    folder: str | None = None
    upload: Upload | None = None
    try:
        reader = await request.multipart()
        while (part := await _next_part(reader)) is not None:
            if not isinstance(part, BodyPartReader):
                raise ValidationFailed("body: nested multipart is not accepted")
            if part.name == "folder":
                folder = check_name("folder", await _form_text(part))
            elif part.name in ("data", "file") and upload is None:
                upload = await resources.receive_upload(
                    _part_chunks(part),
                    target=None if folder is None else (folder, name),
                    declared=_declared_length(part, limit),
                )
            else:
                await part.release()
        if upload is None:
            raise ValidationFailed("body.data: field required (the file, as 'data' or 'file')")
        if folder is None:
            raise ValidationFailed("body.folder: field required")
        yield folder, upload
    finally:
        if upload is not None:
            await upload.discard()


def _declared_length(part: BodyPartReader, limit: int) -> int | None:
    """The file's size, when its part says it (RFC 7578 leaves Content-Length out of form
    parts, and aiohttp ignores it; a client may still send it, and it is then held to it)."""
    value = part.headers.get("Content-Length")
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()):
        raise ValidationFailed("body.data: the file part's Content-Length is not a number")
    if int(value) > limit:
        raise PayloadTooLarge(f"the upload is larger than MAX_UPLOAD_BYTES ({limit} bytes)")
    return int(value)


async def _next_part(reader: MultipartReader) -> Any:
    try:
        return await reader.next()
    except (HttpProcessingError, ValueError, AssertionError):
        raise ValidationFailed("body: malformed multipart/form-data") from None


async def _part_chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while True:
        try:
            chunk = await part.read_chunk(_UPLOAD_READ)
        except (HttpProcessingError, ValueError, AssertionError):
            raise ValidationFailed("body: malformed multipart/form-data") from None
        if not chunk:
            return
        yield chunk


async def _form_text(part: BodyPartReader) -> str:
    # One read_chunk may end short of the part's end: aiohttp 3.8 (Debian 12's) returns what
    # the stream holds when the field's boundary has not arrived yet. Read on to the boundary.
    raw = b""
    while not part.at_eof():
        raw += await part.read_chunk(_MAX_FIELD)
        if len(raw) >= _MAX_FIELD:
            raise ValidationFailed(f"body.{part.name}: too long")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise ValidationFailed(f"body.{part.name}: not UTF-8 text") from None
