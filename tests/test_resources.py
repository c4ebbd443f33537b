"""/upload and /load over a real Unix socket, against the emulator over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import os
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from loader.crypto import encrypted_size, small_part_size
from loader.settings import Settings
from tests.conftest import (
    EMAIL,
    PASSWORD,
    LocalApp,
    RunningEmulator,
    cached_big_part,
    raw_request,
    skip_or_fail,
    upload_form,
)
from tests.emulator import FaultRule
from tests.polling import poll_async

FOLDER = "models"


async def login(app: LocalApp) -> None:
    async with app.session.post(
        app.url("/login"), json={"email": EMAIL, "password": PASSWORD}
    ) as resp:
        assert resp.status == 200


async def upload(app: LocalApp, name: str, data: bytes, **kwargs: Any) -> tuple[int, Any]:
    body, content_type = upload_form(data, **{"folder": FOLDER, **kwargs})
    async with app.session.post(
        app.url(f"/upload/{name}"), data=io.BytesIO(body), headers={"Content-Type": content_type}
    ) as resp:
        return resp.status, await resp.json()


async def load(
    app: LocalApp, name: str, folder: str = FOLDER
) -> tuple[int, bytes, aiohttp.ClientResponse]:
    async with app.session.post(
        app.url(f"/load/{name}"), json={"filename": name, "folder": folder}
    ) as resp:
        return resp.status, await resp.read(), resp


def cache_files(settings: Settings) -> list[str]:
    root = settings.model_cache_dir
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture
async def logged_in(local: LocalApp) -> LocalApp:
    await login(local)
    return local


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 3071, 3072, 3073, 10239, 10240, 3 * 2**20 + 5])
async def test_round_trip_at_the_cut(
    logged_in: LocalApp, emulator: RunningEmulator, settings: Settings, size: int
) -> None:
    data = os.urandom(size)
    name = f"model-{size}.bin"
    assert await upload(logged_in, name, data) == (200, {"status": "ok"})

    blob = encrypted_size(size)
    cut = small_part_size(blob)
    store = emulator.emulator.store
    assert len(store.small_path(FOLDER, name).read_bytes()) == cut
    assert store.big_path(FOLDER, name).stat().st_size == blob - cut
    cached = settings.model_cache_dir / FOLDER / f"{name}.big"
    assert cached_big_part(cached) == store.big_path(FOLDER, name).read_bytes()

    status, body, resp = await load(logged_in, name)
    assert status == 200
    assert resp.headers["Content-Type"] == "application/octet-stream"
    assert int(resp.headers["Content-Length"]) == size
    assert body == data
    # Served from the cache: the CDN was never asked.
    assert emulator.emulator.downloads(f"/cdn/{FOLDER}/{name}.big") == 0


async def test_load_from_the_cdn_fills_the_cache(
    logged_in: LocalApp, emulator: RunningEmulator, settings: Settings
) -> None:
    data = os.urandom(200_000)
    assert (await upload(logged_in, "net.onnx", data))[0] == 200
    cached = settings.model_cache_dir / FOLDER / "net.onnx.big"
    cached.unlink()
    status, body, _ = await load(logged_in, "net.onnx")
    assert (status, body) == (200, data)
    assert cached.exists()
    assert emulator.emulator.downloads("/cdn/models/net.onnx.big") == 1
    status, body, _ = await load(logged_in, "net.onnx")
    assert (status, body) == (200, data)
    assert emulator.emulator.downloads("/cdn/models/net.onnx.big") == 1


async def test_upload_takes_the_file_field_and_any_order(logged_in: LocalApp) -> None:
    data = os.urandom(5000)
    assert (await upload(logged_in, "a.bin", data, field="file"))[0] == 200
    assert (await upload(logged_in, "b.bin", data, folder_first=False))[0] == 200
    for name in ("a.bin", "b.bin"):
        status, body, _ = await load(logged_in, name)
        assert (status, body) == (200, data)


async def test_before_login_both_are_401(local: LocalApp) -> None:
    status, _body, _ = await load(local, "x.bin")
    assert status == 401
    assert (await upload(local, "x.bin", b"data"))[0] == 401


async def test_name_in_path_and_body_must_agree(logged_in: LocalApp) -> None:
    async with logged_in.session.post(
        logged_in.url("/load/a.bin"), json={"filename": "b.bin", "folder": FOLDER}
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["code"] == "name-mismatch"


BAD_NAMES = [
    "..",
    "",
    "/etc/passwd",
    "a/b",
    "a\\b",
    "../etc",
    "%2e%2e",
    "%2e%2e%2fetc",
    "a%2fb",
    "%2Fetc%2Fpasswd",
    "a..b",
    ".hidden",
    "-flag",
    "a%5cb",
    "a%00b",
    "a%20b",
    "n" * 256,
    "%C3%A9t%C3%A9",
]


@pytest.mark.parametrize("bad", BAD_NAMES)
async def test_bad_names_are_400_before_any_io(
    logged_in: LocalApp, emulator: RunningEmulator, settings: Settings, bad: str
) -> None:
    before = emulator.emulator.stats()["requests"]
    body = json.dumps({"filename": "x", "folder": FOLDER}).encode()
    status, answer = await raw_request(logged_in.socket, "POST", f"/load/{bad}", body)
    assert status == 400, (bad, answer)
    assert json.loads(answer)["code"] == "invalid-name"
    boundary = "b0undary"
    form_body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="folder"\r\n\r\n{FOLDER}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="data"; filename="x"\r\n\r\n'
        f"payload\r\n--{boundary}--\r\n"
    ).encode()
    status, answer = await raw_request(
        logged_in.socket,
        "POST",
        f"/upload/{bad}",
        form_body,
        content_type=f"multipart/form-data; boundary={boundary}",
    )
    assert status == 400, (bad, answer)
    assert emulator.emulator.stats()["requests"] == before
    assert cache_files(settings) == []


@pytest.mark.parametrize("bad", ["..", "a/b", "/etc", "a\\b", "a\0b", "", "x" * 256])
async def test_bad_folders_are_400(
    logged_in: LocalApp, emulator: RunningEmulator, settings: Settings, bad: str
) -> None:
    before = emulator.emulator.stats()["requests"]
    async with logged_in.session.post(
        logged_in.url("/load/x.bin"), json={"filename": "x.bin", "folder": bad}
    ) as resp:
        assert resp.status == 400
    status, body = await upload(logged_in, "x.bin", b"payload", folder=bad)
    assert status == 400, body
    assert emulator.emulator.stats()["requests"] == before
    assert cache_files(settings) == []


async def test_a_folder_field_that_arrives_in_pieces_is_read_whole(logged_in: LocalApp) -> None:
    # aiohttp 3.8 (Debian 12's) hands a field over in the pieces the socket gave it.
    boundary = "b0undary"
    pieces = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="folder"\r\n\r\n'.encode(),
        FOLDER[:2].encode(),
        FOLDER[2:].encode(),
        f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="data"; filename="x"\r\n\r\n'
        f"payload\r\n--{boundary}--\r\n".encode(),
    ]

    async def trickle() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece
            await asyncio.sleep(0.05)

    async with logged_in.session.post(
        logged_in.url("/upload/pieces.bin"),
        data=trickle(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    ) as resp:
        assert resp.status == 200, await resp.text()
    status, body, _ = await load(logged_in, "pieces.bin")
    assert (status, body) == (200, b"payload")


async def test_upload_over_the_limit_is_413_and_leaves_nothing(
    make_local_app: Callable[[Settings], Any],
    with_settings: Callable[..., Settings],
    emulator: RunningEmulator,
) -> None:
    settings = with_settings(max_upload_bytes=100_000)
    app: LocalApp = await make_local_app(settings)
    await login(app)

    # Chunked, so the daemon cannot refuse it from the Content-Length alone.
    async def chunks() -> Any:
        for _ in range(40):
            yield os.urandom(8192)

    body = aiohttp.MultipartWriter("form-data")
    body.append("models").set_content_disposition("form-data", name="folder")
    body.append(chunks(), {"Content-Type": "application/octet-stream"}).set_content_disposition(
        "form-data", name="data", filename="big.bin"
    )
    async with app.session.post(app.url("/upload/big.bin"), data=body) as resp:
        assert resp.status == 413
        assert "MAX_UPLOAD_BYTES" in (await resp.json())["detail"]
    assert cache_files(settings) == []
    assert not emulator.emulator.store.big_path(FOLDER, "big.bin").exists()


async def test_missing_small_part_is_404_naming_it(logged_in: LocalApp) -> None:
    status, body, _ = await load(logged_in, "absent.bin")
    assert status == 404
    assert b"small part of models/absent.bin" in body


async def test_missing_big_part_is_404_naming_it(
    logged_in: LocalApp, emulator: RunningEmulator, settings: Settings
) -> None:
    assert (await upload(logged_in, "half.bin", os.urandom(50_000)))[0] == 200
    emulator.emulator.store.big_path(FOLDER, "half.bin").unlink()
    (settings.model_cache_dir / FOLDER / "half.bin.big").unlink()
    status, body, _ = await load(logged_in, "half.bin")
    assert status == 404
    assert b"the CDN has no big part of models/half.bin" in body
    assert cache_files(settings) == []


async def test_cut_cdn_body_resumes_with_range(
    logged_in: LocalApp, emulator: RunningEmulator, settings: Settings
) -> None:
    data = os.urandom(2_000_000)
    assert (await upload(logged_in, "cut.bin", data))[0] == 200
    (settings.model_cache_dir / FOLDER / "cut.bin.big").unlink()
    emulator.emulator.add_rule(
        FaultRule(
            method="GET",
            path_prefix="/cdn/models/cut.bin.big",
            kind="truncate",
            truncate_at=700_000,
        )
    )
    status, body, _ = await load(logged_in, "cut.bin")
    assert (status, body) == (200, data)
    assert emulator.emulator.requests("GET", "/cdn/models/cut.bin.big") == 2
    assert cache_files(settings) == ["models/cut.bin.big"]


async def test_5xx_then_success_on_the_small_part(
    logged_in: LocalApp, emulator: RunningEmulator
) -> None:
    data = os.urandom(9000)
    assert (await upload(logged_in, "flaky.bin", data))[0] == 200
    emulator.emulator.add_rule(
        FaultRule(method="POST", path_prefix="/resources/get/", kind="status", status=503, count=2)
    )
    status, body, _ = await load(logged_in, "flaky.bin")
    assert (status, body) == (200, data)


async def test_token_expiry_in_the_middle_of_an_upload(
    logged_in: LocalApp, emulator: RunningEmulator
) -> None:
    emulator.emulator.add_rule(
        FaultRule(method="PUT", path_prefix="/cdn/", kind="status", status=401, count=1)
    )
    data = os.urandom(100_000)
    assert (await upload(logged_in, "renew.bin", data))[0] == 200
    assert emulator.emulator.stats()["logins"] == 2
    status, body, _ = await load(logged_in, "renew.bin")
    assert (status, body) == (200, data)


async def test_stale_cache_entry_is_fetched_again(
    make_local_app: Callable[[Settings], Any],
    with_settings: Callable[..., Settings],
    emulator: RunningEmulator,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    first: LocalApp = await make_local_app(with_settings())
    other: LocalApp = await make_local_app(with_settings(model_cache_dir=tmp_path / "other-cache"))
    await login(first)
    await login(other)
    old, new = os.urandom(300_000), os.urandom(300_000)
    assert (await upload(first, "model.bin", old))[0] == 200
    # A newer upload of the same name, from elsewhere: first's cache now holds a stale part.
    assert (await upload(other, "model.bin", new))[0] == 200
    caplog.set_level(logging.INFO)
    status, body, _ = await load(first, "model.bin")
    assert (status, body) == (200, new)
    assert "fetching it again" in caplog.text
    assert emulator.emulator.downloads("/cdn/models/model.bin.big") == 1


def held_deleted(root: Path) -> list[str]:
    """Files under `root` that this process still holds open after they were replaced."""
    held = []
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith(str(root)) and target.endswith(" (deleted)"):
                held.append(target)
    return held


async def test_a_replaced_cache_entry_is_freed_after_the_answer(
    logged_in: LocalApp, settings: Settings
) -> None:
    """The entry an upload replaces is held open across the rename and closed by a thread of
    its own: it must be closed all the same, and its space given back."""
    first, second = os.urandom(2_000_000), os.urandom(2_000_000)
    assert (await upload(logged_in, "model.bin", first))[0] == 200
    entry = settings.model_cache_dir / FOLDER / "model.bin.big"
    replaced = entry.stat().st_ino
    assert (await upload(logged_in, "model.bin", second))[0] == 200
    assert entry.stat().st_ino != replaced
    held = await poll_async(lambda: not held_deleted(settings.model_cache_dir), 10)
    assert held, held_deleted(settings.model_cache_dir)
    assert (await load(logged_in, "model.bin"))[:2] == (200, second)


async def test_many_different_loads_side_by_side(logged_in: LocalApp) -> None:
    blobs = {f"m{i}.bin": os.urandom(20_000 + i) for i in range(8)}
    for name, data in blobs.items():
        assert (await upload(logged_in, name, data))[0] == 200
    results = await asyncio.gather(*(load(logged_in, name) for name in blobs))
    assert [body for _, body, _ in results] == list(blobs.values())


async def test_unwritable_cache_serves_from_the_cdn_and_warns_once(
    make_local_app: Callable[[Settings], Any],
    with_settings: Callable[..., Settings],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    writer: LocalApp = await make_local_app(with_settings())
    await login(writer)
    data = os.urandom(40_000)
    assert (await upload(writer, "direct.bin", data))[0] == 200

    reader: LocalApp = await make_local_app(with_settings(model_cache_dir=blocker / "models"))
    await login(reader)
    caplog.set_level(logging.WARNING)
    for _ in range(2):
        status, body, resp = await load(reader, "direct.bin")
        assert (status, body) == (200, data)
        assert int(resp.headers["Content-Length"]) == len(data)
    assert caplog.text.count("cannot be written") == 1
    assert (await upload(reader, "direct2.bin", data))[0] == 200


async def test_a_client_hanging_up_costs_only_its_stream(logged_in: LocalApp) -> None:
    data = os.urandom(8_000_000)
    assert (await upload(logged_in, "long.bin", data))[0] == 200
    async with (
        aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(logged_in.socket))
        ) as quitter,
        quitter.post(
            logged_in.url("/load/long.bin"), json={"filename": "long.bin", "folder": FOLDER}
        ) as resp,
    ):
        assert resp.status == 200
        await resp.content.read(100_000)
        resp.close()
    status, body, _ = await load(logged_in, "long.bin")
    assert (status, body) == (200, data)
    async with logged_in.session.get(logged_in.url("/health")) as resp:
        assert resp.status == 200


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Any:
    if os.geteuid() != 0:
        skip_or_fail("mounting a tmpfs needs root")
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


async def test_disk_full_during_a_load_is_507_and_leaves_nothing(
    make_local_app: Callable[[Settings], Any],
    with_settings: Callable[..., Settings],
    small_tmpfs: Path,
) -> None:
    writer: LocalApp = await make_local_app(with_settings())
    await login(writer)
    data = os.urandom(3_000_000)
    assert (await upload(writer, "huge.bin", data))[0] == 200
    settings = with_settings(model_cache_dir=small_tmpfs / "models")
    reader: LocalApp = await make_local_app(settings)
    await login(reader)
    status, body, _ = await load(reader, "huge.bin")
    assert status == 507
    assert b"no space left" in body
    assert cache_files(settings) == []


async def test_disk_full_during_an_upload_is_507_and_leaves_nothing(
    make_local_app: Callable[[Settings], Any],
    with_settings: Callable[..., Settings],
    small_tmpfs: Path,
    emulator: RunningEmulator,
) -> None:
    settings = with_settings(model_cache_dir=small_tmpfs / "models")
    app: LocalApp = await make_local_app(settings)
    await login(app)
    status, body = await upload(app, "huge.bin", os.urandom(3_000_000))
    assert status == 507
    assert "no space left" in body["detail"]
    assert cache_files(settings) == []
    assert not emulator.emulator.store.small_path(FOLDER, "huge.bin").exists()


@hsettings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=12_000))
async def test_round_trip_property(logged_in: LocalApp, data: bytes) -> None:
    name = "p" + hashlib.sha256(data).hexdigest()[:16]
    assert (await upload(logged_in, name, data))[0] == 200
    status, body, _ = await load(logged_in, name)
    assert (status, body) == (200, data)
