"""Path traversal and name attacks on every endpoint that takes a name (/load, /upload),
sent with a raw request (clients normalise paths): 400 before any I/O."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.conftest import RunningEmulator, raw_request, upload_form
from tests.faults.conftest import FOLDER, Scene, StartApp, assert_clear_error, files_under

# A file an absolute name would point at: it must never appear.
TARGET = "azl-name-attack-target"

PATH_ATTACKS = [
    "..",
    ".",
    "%2e%2e",
    "%2E%2E",
    "%2e%2e%2f",
    "%2e%2e%2fetc%2fpasswd",
    "..%2f..%2f..%2fetc%2fpasswd",
    "..%5c..%5cwindows",
    "a%5cb",
    "%5c",
    "a%00b",
    "%00",
    "a.bin%00.png",
    "/tmp/" + TARGET,
    "%2ftmp%2f" + TARGET,
    "a/b",
    "a%2fb",
    ".hidden",
    "-rf",
    "n" * 256,
    "n" * 300 + ".bin",
    "%C3%A9t%C3%A9.bin",
    "%E2%80%AEnib.exe",
    "%EF%BC%8E%EF%BC%8E",
    "a%20b",
    "a%0ab",
]

BODY_ATTACKS = [
    "..",
    "../etc",
    "/tmp/" + TARGET,
    "a/b",
    "a\\b",
    "a\0b",
    "\u00e9t\u00e9",
    "\uff0e\uff0e",
    "x" * 256,
    "",
    " ",
    ".x",
]


@pytest.fixture
async def scene(start_app: StartApp) -> Scene:
    scene = await start_app()
    assert (await scene.client().login())[0] == 200
    return scene


def assert_no_io(scene: Scene, emulator: RunningEmulator, before: dict[str, int]) -> None:
    assert emulator.emulator.stats()["requests"] == before
    assert files_under(scene.cache, scene.scratch) == []
    assert not Path("/tmp", TARGET).exists()


@pytest.mark.parametrize("name", PATH_ATTACKS)
@pytest.mark.parametrize("endpoint", ["load", "upload"])
async def test_name_in_the_path(
    scene: Scene, emulator: RunningEmulator, endpoint: str, name: str
) -> None:
    before = emulator.emulator.stats()["requests"]
    if endpoint == "load":
        body = json.dumps({"filename": "x.bin", "folder": FOLDER}).encode()
        status, answer = await raw_request(scene.socket, "POST", f"/load/{name}", body)
    else:
        body, content_type = upload_form(folder=FOLDER)
        status, answer = await raw_request(
            scene.socket, "POST", f"/upload/{name}", body, content_type=content_type
        )
    assert_clear_error(status, answer, 400, "invalid-name")
    assert_no_io(scene, emulator, before)
    await scene.assert_after()


@pytest.mark.parametrize("name", BODY_ATTACKS, ids=lambda n: quote(n, safe="") or "empty")
@pytest.mark.parametrize("field", ["load-folder", "load-filename", "upload-folder"])
async def test_name_in_the_body(
    scene: Scene, emulator: RunningEmulator, field: str, name: str
) -> None:
    before = emulator.emulator.stats()["requests"]
    if field.startswith("load"):
        fields = {"filename": "x.bin", "folder": FOLDER}
        fields[field.removeprefix("load-")] = name
        body = json.dumps(fields).encode()
        status, answer = await raw_request(scene.socket, "POST", "/load/x.bin", body)
    else:
        body, content_type = upload_form(folder=name)
        status, answer = await raw_request(
            scene.socket, "POST", "/upload/x.bin", body, content_type=content_type
        )
    # A bad filename in the body differs from the one in the path, which is checked first.
    code = "name-mismatch" if field == "load-filename" else "invalid-name"
    assert_clear_error(status, answer, 400, code)
    assert_no_io(scene, emulator, before)
    await scene.assert_after()
