"""What is served is what the API vouches for: the integrity record of resource-api.md, and a
cache whose entries say what they belong to on any filesystem.

A CDN that alters a big part (a flipped bit, two blocks swapped, another resource's part of
the same size) must never yield a complete answer with other bytes; a resource without a
record loads with a warning, unless REQUIRE_INTEGRITY refuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RunningEmulator, skip_or_fail
from tests.emulator import FaultRule
from tests.faults.conftest import (
    FOLDER,
    Client,
    Loaded,
    Scene,
    StartApp,
    assert_clear_error,
    files_under,
)

RECORD = ".integrity"


async def logged_in(scene: Scene) -> Client:
    client = scene.client()
    assert (await client.login())[0] == 200
    return client


def record_of(emulator: RunningEmulator, name: str) -> dict[str, object] | None:
    path = emulator.emulator.store.small_path(FOLDER, name + RECORD)
    return json.loads(path.read_bytes()) if path.exists() else None


def assert_not_served_whole(loaded: Loaded, data: bytes) -> None:
    """502 integrity-failed before the body, or a body cut before its declared length."""
    if loaded.status == 200:
        assert loaded.cut, "an altered big part was served whole"
        assert len(loaded.body) < len(data)
    else:
        assert_clear_error(loaded.status, loaded.body, 502, "integrity-failed")


async def test_upload_writes_the_record_of_the_whole_blob(
    start_app: StartApp, emulator: RunningEmulator
) -> None:
    scene = await start_app()
    client = await logged_in(scene)
    data = os.urandom(100_000)
    assert (await client.upload("model.bin", data))[0] == 200
    store = emulator.emulator.store
    blob = store.small_path(FOLDER, "model.bin").read_bytes()
    blob += store.big_path(FOLDER, "model.bin").read_bytes()
    assert record_of(emulator, "model.bin") == {
        "v": 1,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "size": len(blob),
    }
    await scene.assert_after(data)


@pytest.mark.parametrize(
    ("method", "prefix"),
    [("PUT", f"/cdn/{FOLDER}/"), ("POST", f"/resources/{FOLDER}")],
    ids=["big-part-refused", "small-part-refused"],
)
async def test_the_record_comes_after_both_parts(
    start_app: StartApp, emulator: RunningEmulator, method: str, prefix: str
) -> None:
    """An upload refused at either part writes no record (it would vouch for a torn blob)."""
    scene = await start_app()
    client = await logged_in(scene)
    emulator.emulator.add_rule(
        FaultRule(method=method, path_prefix=prefix, kind="status", status=400)
    )
    data = os.urandom(50_000)
    status, body = await client.upload("torn.bin", data)
    assert_clear_error(status, body, 502, "remote-refused")
    assert record_of(emulator, "torn.bin") is None
    await scene.assert_after(data)


def replace_with_another_part(emulator: RunningEmulator, name: str) -> None:
    store = emulator.emulator.store
    shutil.copyfile(store.big_path(FOLDER, "other.bin"), store.big_path(FOLDER, name))


@pytest.mark.parametrize("alteration", ["flip-bit", "swap-blocks", "replaced"])
@pytest.mark.parametrize("cached", [False, True], ids=["into-the-cache", "cache-unwritable"])
async def test_an_altered_cdn_part_is_never_served_whole(
    start_app: StartApp, emulator: RunningEmulator, tmp_path: Path, alteration: str, cached: bool
) -> None:
    writer = await start_app()
    client = await logged_in(writer)
    data, other = os.urandom(1_000_000), os.urandom(1_000_000)
    assert (await client.upload("model.bin", data))[0] == 200
    assert (await client.upload("other.bin", other))[0] == 200
    if alteration == "replaced":
        replace_with_another_part(emulator, "model.bin")
    else:
        emulator.emulator.add_rule(
            FaultRule(method="GET", path_prefix="/cdn/", kind=alteration, count=None)  # type: ignore[arg-type]
        )
    if cached:
        blocker = tmp_path / "not-a-folder"
        blocker.write_text("a file where the cache folder should be")
        reader = await start_app(model_cache_dir=blocker / "models")
    else:
        reader = await start_app(model_cache_dir=tmp_path / "reader-cache")
    loaded = await (await logged_in(reader)).load("model.bin")
    assert_not_served_whole(loaded, data)
    if not cached:  # the check comes before the entry is committed: whole and before the body
        assert_clear_error(loaded.status, loaded.body, 502, "integrity-failed")
    assert files_under(reader.cache) == []
    await reader.assert_after(data, other)


async def test_a_failed_check_removes_the_stale_entry(
    start_app: StartApp, emulator: RunningEmulator, tmp_path: Path
) -> None:
    first = await start_app()
    second = await start_app(model_cache_dir=tmp_path / "second-cache")
    one, two = await logged_in(first), await logged_in(second)
    old, new = os.urandom(200_000), os.urandom(200_000)
    assert (await one.upload("model.bin", old))[0] == 200
    assert (await two.upload("model.bin", new))[0] == 200  # first's entry is now stale
    emulator.emulator.add_rule(FaultRule(method="GET", path_prefix="/cdn/", kind="flip-bit"))
    loaded = await one.load("model.bin")
    assert_clear_error(loaded.status, loaded.body, 502, "integrity-failed")
    assert files_under(first.cache) == []
    loaded = await one.load("model.bin")  # the CDN is honest again
    assert (loaded.status, loaded.body) == (200, new)
    await first.assert_after(old, new)


async def test_a_resource_without_a_record_loads_with_a_warning(
    start_app: StartApp, emulator: RunningEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    scene = await start_app()
    client = await logged_in(scene)
    data = os.urandom(300_000)
    assert (await client.upload("old.bin", data))[0] == 200
    # As if uploaded before records existed.
    emulator.emulator.store.small_path(FOLDER, "old.bin" + RECORD).unlink()
    (scene.cache / FOLDER / "old.bin.big").unlink()
    caplog.set_level(logging.WARNING)
    for _ in range(2):  # from the CDN, then from the cache
        loaded = await client.load("old.bin")
        assert (loaded.status, loaded.body) == (200, data)
    assert caplog.text.count("has no integrity record") == 2
    await scene.assert_after(data)


async def test_require_integrity_refuses_a_resource_without_a_record(
    start_app: StartApp, emulator: RunningEmulator
) -> None:
    scene = await start_app(require_integrity=True)
    client = await logged_in(scene)
    data = os.urandom(300_000)
    assert (await client.upload("old.bin", data))[0] == 200
    loaded = await client.load("old.bin")
    assert (loaded.status, loaded.body) == (200, data)
    emulator.emulator.store.small_path(FOLDER, "old.bin" + RECORD).unlink()
    loaded = await client.load("old.bin")
    assert_clear_error(loaded.status, loaded.body, 502, "integrity-missing", "REQUIRE_INTEGRITY")
    await scene.assert_after(data)


async def test_a_record_that_is_not_one_is_refused(
    start_app: StartApp, emulator: RunningEmulator
) -> None:
    scene = await start_app()
    client = await logged_in(scene)
    data = os.urandom(30_000)
    assert (await client.upload("model.bin", data))[0] == 200
    emulator.emulator.store.small_path(FOLDER, "model.bin" + RECORD).write_bytes(b"{not json")
    loaded = await client.load("model.bin")
    assert_clear_error(loaded.status, loaded.body, 502, "integrity-failed", "not valid JSON")
    await scene.assert_after(data)


@pytest.mark.parametrize("name", ["model.integrity", "a" * 246])
async def test_names_kept_for_records_are_refused(start_app: StartApp, name: str) -> None:
    scene = await start_app()
    client = await logged_in(scene)
    status, body = await client.upload(name, b"data")
    assert_clear_error(status, body, 400, "invalid-name")
    loaded = await client.load(name)
    assert_clear_error(loaded.status, loaded.body, 400, "invalid-name")


async def test_the_longest_name_with_room_for_its_record(start_app: StartApp) -> None:
    scene = await start_app()
    client = await logged_in(scene)
    name, data = "a" * 245, os.urandom(20_000)
    assert (await client.upload(name, data))[0] == 200
    loaded = await client.load(name)
    assert (loaded.status, loaded.body) == (200, data)


# ---- the cache on any filesystem ------------------------------------------------------


@pytest.fixture(params=["ramfs", "tmpfs", "ext4"])
def cache_fs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A folder on a freshly mounted filesystem; ramfs keeps no user xattrs, like vfat."""
    if os.geteuid() != 0:
        skip_or_fail("mounting a filesystem needs root")
    kind: str = request.param
    mount = tmp_path / kind
    mount.mkdir()
    if kind == "ext4":
        image = tmp_path / "ext4.img"
        subprocess.run(["truncate", "-s", "32M", str(image)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    else:
        subprocess.run(["mount", "-t", kind, kind, str(mount)], check=True)
    try:
        probe = mount / "probe"
        probe.touch()
        try:
            os.setxattr(probe, "user.probe", b"1")
        except OSError:
            assert kind == "ramfs", f"{kind} refused a user xattr"
        else:
            assert kind != "ramfs", "ramfs took a user xattr: the test would prove nothing"
        probe.unlink()
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


async def test_a_new_upload_elsewhere_is_loaded_new(
    start_app: StartApp, cache_fs: Path, tmp_path: Path
) -> None:
    """Two devices on one API: this one's cache holds the old big part under the same name;
    its next load is the new bytes, whatever the cache's filesystem."""
    device = await start_app(model_cache_dir=cache_fs / "models")
    other = await start_app(model_cache_dir=tmp_path / "other-cache")
    here, there = await logged_in(device), await logged_in(other)
    old, new = os.urandom(500_000), os.urandom(500_000)
    assert (await here.upload("model.bin", old))[0] == 200
    loaded = await here.load("model.bin")
    assert (loaded.status, loaded.body) == (200, old)
    assert (await there.upload("model.bin", new))[0] == 200
    loaded = await here.load("model.bin")
    assert (loaded.status, loaded.body) == (200, new)
    # Without a record, the small part alone tells the entry is stale.
    assert (await there.upload("model.bin", old))[0] == 200
    device.emulator.store.small_path(FOLDER, "model.bin" + RECORD).unlink()
    loaded = await here.load("model.bin")
    assert (loaded.status, loaded.body) == (200, old)
    await device.assert_after(old, new)


async def test_an_entry_that_says_nothing_of_its_origin_is_not_trusted(
    start_app: StartApp, emulator: RunningEmulator, tmp_path: Path
) -> None:
    """A bare big part in the cache (copied in, restored from a backup, left by an older
    loader) is fetched again, not joined to whatever small part is current."""
    device = await start_app()
    other = await start_app(model_cache_dir=tmp_path / "other-cache")
    here, there = await logged_in(device), await logged_in(other)
    old, new = os.urandom(200_000), os.urandom(200_000)
    assert (await here.upload("model.bin", old))[0] == 200
    stale_part = emulator.emulator.store.big_path(FOLDER, "model.bin").read_bytes()
    assert (await there.upload("model.bin", new))[0] == 200
    entry = device.cache / FOLDER / "model.bin.big"
    entry.write_bytes(stale_part)
    loaded = await here.load("model.bin")
    assert (loaded.status, loaded.body) == (200, new)
    assert emulator.emulator.downloads(f"/cdn/{FOLDER}/model.bin.big") == 1
    await device.assert_after(old, new)
