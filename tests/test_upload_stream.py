"""/upload sends the big part to the CDN while the body still arrives: what that must not
break. The caller's body is held half-way at a gate of the test's, so "while" is certain;
the emulator runs over real HTTP, as a CDN that reads a refused body first or answers at
once, and as one that insists on a Content-Length."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from loader.settings import Settings
from tests.conftest import (
    EMAIL,
    FORM_BOUNDARY,
    PASSWORD,
    LocalApp,
    RunningEmulator,
    wait_for,
)
from tests.faults.conftest import files_under, partial_files

FOLDER = "models"
MiB = 1024 * 1024
SIZE = 8 * MiB


@pytest.fixture
async def app(make_local_app: Callable[[Settings], Any], settings: Settings) -> LocalApp:
    local: LocalApp = await make_local_app(settings)
    async with local.session.post(
        local.url("/login"), json={"email": EMAIL, "password": PASSWORD}
    ) as resp:
        assert resp.status == 200
    return local


class HeldBody:
    """An /upload body whose first half is sent at once and the rest only on `release()`."""

    def __init__(
        self, data: bytes, *, declared: int | None = None, after: tuple[str, str] = ("", "")
    ) -> None:
        self.data = data
        self.declared = declared
        # More of the form after the file, in two pieces; with `after`, the body is held
        # between them rather than half-way through the file.
        self.after = after
        self._gate = asyncio.Event()

    def release(self) -> None:
        self._gate.set()

    async def _pieces(self) -> AsyncIterator[bytes]:
        half = len(self.data) // 2 if not any(self.after) else len(self.data)
        for start in range(0, len(self.data), MiB):
            if start >= half:
                await self._gate.wait()
            yield self.data[start : start + MiB]
        if any(self.after):
            yield f"\r\n{self.after[0]}".encode()
            await self._gate.wait()
            yield self.after[1].encode()

    async def _raw(self) -> AsyncIterator[bytes]:
        length = f"Content-Length: {self.declared}\r\n" if self.declared is not None else ""
        yield (
            f'--{FORM_BOUNDARY}\r\nContent-Disposition: form-data; name="folder"\r\n\r\n'
            f"{FOLDER}\r\n--{FORM_BOUNDARY}\r\n"
            'Content-Disposition: form-data; name="data"; filename="upload.bin"\r\n'
            f"Content-Type: application/octet-stream\r\n{length}\r\n"
        ).encode()
        async for piece in self._pieces():
            yield piece
        yield f"{'' if any(self.after) else chr(13) + chr(10)}--{FORM_BOUNDARY}--\r\n".encode()

    async def post(self, app: LocalApp, name: str) -> tuple[int, Any]:
        """POST the form, hand-built so that the file part may declare its length."""
        headers = {"Content-Type": f"multipart/form-data; boundary={FORM_BOUNDARY}"}
        async with app.session.post(
            app.url(f"/upload/{name}"), data=self._raw(), headers=headers
        ) as resp:
            return resp.status, await resp.json()


async def upload(app: LocalApp, name: str, data: bytes) -> tuple[int, Any]:
    body = HeldBody(data)
    body.release()
    return await body.post(app, name)


async def load(app: LocalApp, name: str) -> tuple[int, bytes]:
    async with app.session.post(
        app.url(f"/load/{name}"), json={"filename": name, "folder": FOLDER}
    ) as resp:
        return resp.status, await resp.read()


def puts(emulator: RunningEmulator, name: str) -> int:
    return emulator.emulator.requests("PUT", f"/cdn/{FOLDER}/{name}.big")


def leftovers(settings: Settings, emulator: RunningEmulator) -> list[Path]:
    """Partial files in the cache, and big parts the emulator was still receiving."""
    incoming = emulator.emulator.config.storage_dir / "incoming"
    return partial_files(settings.model_cache_dir) + files_under(incoming)


async def test_the_big_part_goes_while_the_body_arrives(
    app: LocalApp, emulator: RunningEmulator
) -> None:
    data = os.urandom(SIZE)
    body = HeldBody(data)
    posting = asyncio.create_task(body.post(app, "live.bin"))
    # Half the body is in, the rest held: the PUT has started all the same.
    await wait_for(lambda: puts(emulator, "live.bin") == 1, 10, "the PUT of the big part")
    assert not posting.done()
    body.release()
    assert (await posting)[0] == 200
    assert puts(emulator, "live.bin") == 1
    assert await load(app, "live.bin") == (200, data)


async def test_a_body_cut_short_leaves_the_previous_version(
    app: LocalApp, emulator: RunningEmulator, settings: Settings
) -> None:
    before = os.urandom(SIZE)
    assert (await upload(app, "kept.bin", before))[0] == 200
    big = emulator.emulator.store.big_path(FOLDER, "kept.bin")
    stored = big.read_bytes()
    posting = asyncio.create_task(HeldBody(os.urandom(SIZE)).post(app, "kept.bin"))
    await wait_for(lambda: puts(emulator, "kept.bin") == 2, 10, "the second PUT")
    posting.cancel()  # the caller hangs up half-way
    with contextlib.suppress(asyncio.CancelledError):
        await posting
    # The PUT in flight is dropped, and the CDN keeps nothing of it.
    await wait_for(lambda: not leftovers(settings, emulator), 10, "the partial files to go")
    assert big.read_bytes() == stored
    assert await load(app, "kept.bin") == (200, before)


@pytest.mark.parametrize(
    "emulator",
    [{"refuse_early": False}, {"refuse_early": True}],
    ids=["body-read-then-401", "401-at-once"],
    indirect=True,
)
async def test_a_401_midway_sends_the_big_part_again_from_the_spool(
    app: LocalApp, emulator: RunningEmulator
) -> None:
    emu = emulator.emulator
    gate = emu.hold("PUT", f"/cdn/{FOLDER}/")
    data = os.urandom(SIZE)
    body = HeldBody(data)
    posting = asyncio.create_task(body.post(app, "renew.bin"))
    await wait_for(lambda: gate.held == 1, 10, "the PUT at the gate")
    emu.revoke_tokens()  # the token expires while the part is on its way
    gate.open()
    if emu.config.refuse_early:
        # Refused at once: logged in again, and sent again while the spool still grows.
        await wait_for(lambda: puts(emulator, "renew.bin") == 2, 10, "the PUT sent again")
        assert not posting.done()
    body.release()
    assert (await posting)[0] == 200
    assert puts(emulator, "renew.bin") == 2
    assert emu.stats()["logins"] == 2
    assert await load(app, "renew.bin") == (200, data)


@pytest.mark.parametrize(
    "emulator",
    [
        {"cdn_requires_length": True, "refuse_early": False},
        {"cdn_requires_length": True, "refuse_early": True},
    ],
    ids=["body-read-then-411", "411-at-once"],
    indirect=True,
)
async def test_a_cdn_that_insists_on_a_length_gets_one(
    app: LocalApp, emulator: RunningEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="loader")
    first, second = os.urandom(SIZE), os.urandom(SIZE)
    assert (await upload(app, "first.bin", first))[0] == 200
    # Refused chunked (411), then sent with its length once the body was in.
    assert puts(emulator, "first.bin") == 2
    assert (await upload(app, "second.bin", second))[0] == 200
    # The daemon remembers: the next upload goes with its length at the first try.
    assert puts(emulator, "second.bin") == 1
    assert await load(app, "first.bin") == (200, first)
    assert await load(app, "second.bin") == (200, second)
    warnings = [r.getMessage() for r in caplog.records if "refuses a big part" in r.getMessage()]
    assert len(warnings) == 1
    assert "411" in warnings[0]


@pytest.mark.parametrize("emulator", [{"cdn_requires_length": True}], indirect=True)
async def test_a_declared_length_streams_with_content_length(
    app: LocalApp, emulator: RunningEmulator
) -> None:
    data = os.urandom(SIZE)
    body = HeldBody(data, declared=len(data))
    posting = asyncio.create_task(body.post(app, "sized.bin"))
    await wait_for(lambda: puts(emulator, "sized.bin") == 1, 10, "the PUT of the big part")
    assert not posting.done()
    body.release()
    assert (await posting)[0] == 200
    assert puts(emulator, "sized.bin") == 1  # taken at once: it came with its length
    assert await load(app, "sized.bin") == (200, data)


@pytest.mark.parametrize("error", [-1, +1, 3 * MiB], ids=["shorter", "longer", "far-longer"])
async def test_a_wrong_declared_length_is_422_and_changes_nothing(
    app: LocalApp, emulator: RunningEmulator, settings: Settings, error: int
) -> None:
    before = os.urandom(SIZE)
    assert (await upload(app, "kept.bin", before))[0] == 200
    body = HeldBody(os.urandom(SIZE), declared=SIZE + error)
    body.release()
    status, answer = await body.post(app, "kept.bin")
    assert status == 422
    assert "Content-Length" in answer["detail"]
    await wait_for(lambda: not leftovers(settings, emulator), 10, "the partial files to go")
    assert await load(app, "kept.bin") == (200, before)


@pytest.mark.parametrize("declared", [None, SIZE], ids=["chunked", "with-length"])
async def test_a_form_found_bad_after_the_file_changes_nothing(
    app: LocalApp, emulator: RunningEmulator, settings: Settings, declared: int | None
) -> None:
    """The whole file is in and spooled, then a field after it is refused: the PUT has all
    but its last bytes meanwhile, and must not complete."""
    before = os.urandom(SIZE)
    assert (await upload(app, "kept.bin", before))[0] == 200
    big = emulator.emulator.store.big_path(FOLDER, "kept.bin")
    stored = big.read_bytes()
    bad_field = (
        f'--{FORM_BOUNDARY}\r\nContent-Disposition: form-data; name="folder"\r\n\r\n',
        "../etc\r\n",
    )
    body = HeldBody(os.urandom(SIZE), declared=declared, after=bad_field)
    posting = asyncio.create_task(body.post(app, "kept.bin"))
    path = f"/cdn/{FOLDER}/kept.bin.big"
    sent_before = emulator.emulator.received(path)
    await wait_for(
        lambda: emulator.emulator.received(path) - sent_before >= len(stored) - 16,
        10,
        "the big part, all but its last block, at the CDN",
    )
    assert big.read_bytes() == stored  # held short of complete
    body.release()
    status, answer = await posting
    assert (status, answer["code"]) == (400, "invalid-name")
    await wait_for(lambda: not leftovers(settings, emulator), 10, "the partial files to go")
    assert big.read_bytes() == stored
    assert await load(app, "kept.bin") == (200, before)
