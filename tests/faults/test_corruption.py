"""Any damage to a resource's big part, in the cache or on the CDN, ends in the one
decryption error (502 decryption-failed before the body, or a stream cut short), or in the
right plaintext once the loader has fetched a good copy again: never another error or a 500.

The blob format is AES-CBC without an integrity tag: damage in the middle of a big part on
the CDN decrypts into a wrong block or two with valid padding, and nothing in the contract
lets the loader tell. So for the CDN the property is only "no other error, no 500"; for the
loader's own cache, which it wrote and can check, a wrong plaintext is a failure.
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


def assert_one_decryption_error(loaded: Loaded) -> None:
    """A 502 decryption-failed before the body, or a 200 whose body was cut."""
    if loaded.status == 200:
        return
    assert_clear_error(loaded.status, loaded.body, 502, "decryption-failed")


@SETTINGS
@given(damage=damages, size=sizes)
async def test_damaged_cache_entry(
    scene: Scene, emulator: RunningEmulator, damage: Damage, size: int
) -> None:
    loaded, data, name = await damaged_load(scene, emulator, damage, size, in_cache=True)
    assert_one_decryption_error(loaded)
    if loaded.status == 200 and not loaded.cut:
        assert loaded.body == data, (
            f"a damaged cache entry ({damage}) was served as good data: "
            f"{sum(a != b for a, b in zip(loaded.body, data, strict=False))} bytes differ"
        )
    await scene.assert_after(data)
    # The cache heals: the next load is the right plaintext.
    again = await scene.client().load(name)
    assert (again.status, again.body) == (200, data)


@SETTINGS
@given(damage=damages, size=sizes)
async def test_damaged_cdn_part(
    scene: Scene, emulator: RunningEmulator, damage: Damage, size: int
) -> None:
    loaded, data, _ = await damaged_load(scene, emulator, damage, size, in_cache=False)
    assert_one_decryption_error(loaded)
    if loaded.status == 200 and not loaded.cut:
        assert len(loaded.body) == loaded.content_length
    await scene.assert_after(data)
