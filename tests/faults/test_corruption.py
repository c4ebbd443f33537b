"""Any damage to a resource's big part, in the cache or on the CDN, never reaches a caller
as a complete answer with other bytes.

AES-CBC has no integrity tag: damage in the middle of a big part decrypts into a wrong block
or two with valid padding. The API's integrity record (resource-api.md) is what lets the
loader tell: damage on the CDN is a 502 integrity-failed before the body, and nothing is
cached; damage in the loader's own cache ends in a 502 before the body, a stream cut short,
or the right plaintext once the loader has fetched a good copy again.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from tests.conftest import RunningEmulator
from tests.faults.conftest import FOLDER, Loaded, Scene, StartApp, assert_clear_error


@dataclass(frozen=True)
class Damage:
    """What is done to the big part: `kind` at `where` (0..1 of its length)."""

    kind: str
    where: float
    data: bytes

    def apply(self, part: bytes) -> bytes:
        at = min(int(self.where * len(part)), max(len(part) - 1, 0))
        if self.kind == "flip":
            if not part:
                return b"\x00"
            mask = self.data[0] or 1
            return part[:at] + bytes([part[at] ^ mask]) + part[at + 1 :]
        if self.kind == "truncate":
            return part[: max(0, len(part) - len(self.data))]
        if self.kind == "extend":
            return part + self.data
        if self.kind == "overwrite":
            damaged = part[:at] + self.data + part[at + len(self.data) :]
            return damaged if damaged != part else damaged + b"\x00"
        if self.kind == "empty":
            return b"" if part else b"\x00"
        raise AssertionError(self.kind)


damages = st.builds(
    Damage,
    kind=st.sampled_from(["flip", "truncate", "extend", "overwrite", "empty"]),
    where=st.floats(0, 1),
    data=st.binary(min_size=1, max_size=48),
)
sizes = st.sampled_from([0, 1, 15, 16, 3000, 11_000, 70_000])
_names = itertools.count()

SETTINGS = hsettings(
    max_examples=40,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
)


@pytest.fixture
async def scene(start_app: StartApp) -> Scene:
    scene = await start_app()
    assert (await scene.client().login())[0] == 200
    return scene


async def damaged_load(
    scene: Scene, emulator: RunningEmulator, damage: Damage, size: int, in_cache: bool
) -> tuple[Loaded, bytes, str]:
    client = scene.client()
    name = f"r{next(_names)}.bin"
    data = os.urandom(size)
    assert (await client.upload(name, data))[0] == 200
    cached = scene.cache / FOLDER / f"{name}.big"
    target = cached if in_cache else emulator.emulator.store.big_path(FOLDER, name)
    if not in_cache:
        cached.unlink()
    damage_file(target, damage)
    return await client.load(name), data, name


def damage_file(path: Path, damage: Damage) -> None:
    path.write_bytes(damage.apply(path.read_bytes()))


def assert_damage_refused(loaded: Loaded, data: bytes, damage: Damage) -> None:
    """A 502 before the body, a 200 whose body was cut, or the right plaintext whole."""
    if loaded.status != 200:
        answer = assert_clear_error(loaded.status, loaded.body, 502)
        assert answer["code"] in ("integrity-failed", "decryption-failed"), answer
    elif not loaded.cut:
        assert loaded.body == data, (
            f"a damaged big part ({damage}) was served as good data: "
            f"{sum(a != b for a, b in zip(loaded.body, data, strict=False))} bytes differ"
        )


@SETTINGS
@given(damage=damages, size=sizes)
async def test_damaged_cache_entry(
    scene: Scene, emulator: RunningEmulator, damage: Damage, size: int
) -> None:
    loaded, data, name = await damaged_load(scene, emulator, damage, size, in_cache=True)
    assert_damage_refused(loaded, data, damage)
    await scene.assert_after(data)
    # The cache heals: the next load is the right plaintext.
    again = await scene.client().load(name)
    assert (again.status, again.body) == (200, data)


@SETTINGS
@given(damage=damages, size=sizes)
async def test_damaged_cdn_part(
    scene: Scene, emulator: RunningEmulator, damage: Damage, size: int
) -> None:
    loaded, data, name = await damaged_load(scene, emulator, damage, size, in_cache=False)
    assert_clear_error(loaded.status, loaded.body, 502, "integrity-failed")
    assert not (scene.cache / FOLDER / f"{name}.big").exists()
    await scene.assert_after(data)
