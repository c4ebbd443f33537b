"""Small and big parts on disk, under names the contract allows and nothing else."""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
from collections.abc import AsyncIterable
from pathlib import Path
from typing import BinaryIO

# The naming rule of contracts/resource-api.md, "Names".
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
SMALL_SUFFIX = ".small"
BIG_SUFFIX = ".big"
MAX_SMALL_PART = 1 << 20
_WRITE_BATCH = 1 << 20


class InvalidName(ValueError):
    """A folder or file name outside the contract's naming rule."""


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name) or ".." in name:
        raise InvalidName(f"invalid name {name!r}")
    return name


def split_file_name(file_name: str, suffix: str) -> str:
    """``NAME.small`` -> ``NAME``, refusing any other suffix or a bad NAME."""
    if not file_name.endswith(suffix):
        raise InvalidName(f"{file_name!r} does not end in {suffix}")
    return check_name(file_name[: -len(suffix)])


class PartStore:
    """Keeps parts as ``small/FOLDER/NAME`` and ``big/FOLDER/NAME`` under ``root``.

    The suffix is left out on disk so that a 255-character NAME still fits a file
    name. Every write lands in ``incoming/`` first and is renamed into place, so a
    concurrent reader sees the old part or the new one, never half of one.
    """

    def __init__(self, root: Path) -> None:
        self._root = root
        self._incoming = root / "incoming"

    def small_path(self, folder: str, name: str) -> Path:
        return self._root / "small" / check_name(folder) / check_name(name)

    def big_path(self, folder: str, name: str) -> Path:
        return self._root / "big" / check_name(folder) / check_name(name)

    async def put_small(self, folder: str, name: str, data: bytes) -> bool:
        """Store a small part; True when it replaced one."""
        path = self.small_path(folder, name)
        return await asyncio.get_running_loop().run_in_executor(None, self._write_whole, path, data)

    async def get_small(self, folder: str, name: str) -> bytes | None:
        path = self.small_path(folder, name)
        return await asyncio.get_running_loop().run_in_executor(None, _read_or_none, path)

    async def put_big(self, folder: str, name: str, body: AsyncIterable[bytes]) -> bool:
        """Stream a big part to disk in batches, off the event loop; True when it replaced one.

        Nothing is kept when ``body`` fails part way.
        """
        path = self.big_path(folder, name)
        loop = asyncio.get_running_loop()
        file, incoming = await loop.run_in_executor(None, self._open_incoming)
        try:
            batch: list[bytes] = []
            batched = 0
            async for chunk in body:
                batch.append(chunk)
                batched += len(chunk)
                if batched >= _WRITE_BATCH:
                    await loop.run_in_executor(None, file.writelines, batch)
                    batch, batched = [], 0
            await loop.run_in_executor(None, file.writelines, batch)
            return await loop.run_in_executor(None, _commit, file, incoming, path)
        finally:
            # Quick, and must also run when the task is cancelled: done in place.
            file.close()
            incoming.unlink(missing_ok=True)

    def _open_incoming(self) -> tuple[BinaryIO, Path]:
        self._incoming.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self._incoming, prefix="part-")
        return os.fdopen(fd, "wb"), Path(name)

    def _write_whole(self, path: Path, data: bytes) -> bool:
        file, incoming = self._open_incoming()
        try:
            file.write(data)
            return _commit(file, incoming, path)
        finally:
            file.close()
            incoming.unlink(missing_ok=True)


def _commit(file: BinaryIO, incoming: Path, path: Path) -> bool:
    file.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    replaced = path.exists()
    os.replace(incoming, path)
    return replaced


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
