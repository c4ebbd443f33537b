"""Shared fixtures: the emulator over real HTTP, the app on a real Unix socket, daemon processes."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from loader.app import make_app
from loader.archive import EncryptedArchive, Image, index_members, read_images
from loader.cache import ModelCache
from loader.crypto import key_from_fragment
from loader.log import Redactor
from loader.server import make_runner, make_site
from loader.settings import Settings
from loader.systemd import Notifier
from tests.dockerd import (
    ArchiveInfo,
    DockerdError,
    PrivateDockerd,
    build_stack_images,
    remove_images,
    stack_tags,
    write_archive,
)
from tests.emulator import Emulator, EmulatorConfig
from tests.emulator import make_app as make_emulator_app
from tests.polling import poll_async

EMAIL = "operator@azaion.test"
PASSWORD = "correct-horse-battery"
ARCHIVE_FRAGMENT = b"archive-fragment-\x00\x01\xfe"
RESOURCE_FRAGMENT = b"resource-fragment-\x02\x03\xfd"

IN_CI = os.environ.get("AZAION_CI") == "1"


def skip_or_fail(reason: str) -> None:
    """Skip a test whose real part is missing here; in CI such a test must run, so fail."""
    if IN_CI:
        pytest.fail(f"CI must run this test, but: {reason}")
    pytest.skip(reason)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A folder with a short path: Unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="azl-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class RunningEmulator:
    emulator: Emulator
    url: str

    @property
    def cdn_url(self) -> str:
        return self.url + "/cdn"


@pytest.fixture
async def emulator(
    aiohttp_server: Callable[..., Any], tmp_path: Path, request: pytest.FixtureRequest
) -> RunningEmulator:
    """The emulator over HTTP; a test may set more of its EmulatorConfig through indirect
    parametrization (`@pytest.mark.parametrize("emulator", [{...}], indirect=True)`)."""
    config = EmulatorConfig(
        users={EMAIL: PASSWORD},
        archive_fragment=ARCHIVE_FRAGMENT,
        resource_fragment=RESOURCE_FRAGMENT,
        storage_dir=tmp_path / "emulator",
        **getattr(request, "param", {}),
    )
    emu = Emulator(config)
    server = await aiohttp_server(make_emulator_app(emu))
    return RunningEmulator(emu, f"http://127.0.0.1:{server.port}")


@pytest.fixture
def settings(emulator: RunningEmulator, short_dir: Path, tmp_path: Path) -> Settings:
    return Settings(
        resource_api_url=emulator.url,
        cdn_url=emulator.cdn_url,
        images_path=tmp_path / "images.enc",
        model_cache_dir=tmp_path / "models",
        socket_path=short_dir / "loader.sock",
        connect_timeout=2.0,
        api_timeout=5.0,
        read_timeout=5.0,
        api_retries=2,
        shutdown_grace=5.0,
    )


@dataclass
class LocalApp:
    """The app served on a real Unix socket in this process, and a client session for it."""

    app: web.Application
    session: aiohttp.ClientSession
    redact: Redactor
    socket: Path

    def url(self, path: str) -> str:
        return "http://loader" + path


@pytest.fixture
async def make_local_app() -> AsyncIterator[Callable[[Settings], Any]]:
    runners: list[web.AppRunner] = []
    sessions: list[aiohttp.ClientSession] = []

    async def start(settings: Settings) -> LocalApp:
        if runners:  # each app of a test gets its own socket
            settings = replace(
                settings, socket_path=settings.socket_path.with_name(f"app{len(runners)}.sock")
            )
        redact = Redactor()
        app = make_app(settings, redact, Notifier({}))
        runner = make_runner(app, settings)
        await runner.setup()
        runners.append(runner)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(settings.socket_path))
        await make_site(runner, sock, settings).start()
        session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(settings.socket_path))
        )
        sessions.append(session)
        return LocalApp(app, session, redact, settings.socket_path)

    yield start
    for session in sessions:
        await session.close()
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def local(make_local_app: Callable[[Settings], Any], settings: Settings) -> LocalApp:
    app: LocalApp = await make_local_app(settings)
    return app


def archive_images(path: Path) -> dict[str, Image]:
    """Each tag's image as the encrypted image archive at `path` holds it."""
    with EncryptedArchive.open(path, key_from_fragment(ARCHIVE_FRAGMENT)) as archive:
        images = read_images(archive, index_members(archive))
    return {tag: image for image in images for tag in image.tags}


def archive_ids(path: Path) -> dict[str, str]:
    """Each tag's image ID as the encrypted image archive at `path` gives it."""
    return {tag: image.id for tag, image in archive_images(path).items()}


def cached_big_part(path: Path) -> bytes | None:
    """The big part a cache entry FOLDER/NAME.big holds; None if it is not a sound entry."""
    cache = ModelCache(path.parent.parent)
    entry = cache.open(path.parent.name, path.name.removesuffix(".big"))
    if entry is None:
        return None
    with entry.file:
        return entry.file.read(entry.size)


def daemon_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a daemon process for `settings`, less our LISTEN_* and NOTIFY_*."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_"))
    }
    env.update(
        RESOURCE_API_URL=settings.resource_api_url,
        CDN_URL=settings.cdn_url,
        IMAGES_PATH=str(settings.images_path),
        MODEL_CACHE_DIR=str(settings.model_cache_dir),
        LOADER_SOCKET=str(settings.socket_path),
        CONNECT_TIMEOUT=str(settings.connect_timeout),
        API_TIMEOUT=str(settings.api_timeout),
        API_RETRIES=str(settings.api_retries),
        SHUTDOWN_GRACE=str(settings.shutdown_grace),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def loader_command() -> list[str]:
    """The installed console script, as a person or a unit would run it."""
    script = Path(sys.executable).with_name("azaion-loader")
    return [str(script)] if script.exists() else [sys.executable, "-m", "loader"]


async def wait_for(
    condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition"
) -> Any:
    """Poll `condition` (sync or async) until it is truthy; fail after `timeout`."""
    result = await poll_async(condition, timeout)
    if not result:
        pytest.fail(f"timed out after {timeout} s waiting for {what}")
    return result


def socket_answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


@pytest.fixture
def with_settings(settings: Settings) -> Callable[..., Settings]:
    def build(**changes: Any) -> Settings:
        return replace(settings, **changes)

    return build


async def raw_request(
    socket_path: Path,
    method: str,
    path: str,
    body: bytes = b"",
    content_type: str = "application/json",
) -> tuple[int, bytes]:
    """One HTTP/1.1 request with the path sent exactly as given (clients normalise `..`)."""
    reader, writer = await asyncio.open_unix_connection(str(socket_path))
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: loader\r\nConnection: close\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    writer.write(head.encode("latin-1") + body)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    _, _, payload = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), payload


FORM_BOUNDARY = "azl-form-5d1f0c"


def upload_form(
    data: bytes = b"payload",
    folder: str = "models",
    *,
    field: str = "data",
    folder_first: bool = True,
) -> tuple[bytes, str]:
    """An /upload body (multipart/form-data) and its Content-Type, built by hand so that the
    folder goes exactly as given, even text a client would refuse; for aiohttp and raw_request."""
    folder_part = (
        f'--{FORM_BOUNDARY}\r\nContent-Disposition: form-data; name="folder"\r\n\r\n{folder}\r\n'
    ).encode()
    data_part = (
        (
            f'--{FORM_BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; '
            'filename="upload.bin"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()
        + data
        + b"\r\n"
    )
    parts = [folder_part, data_part] if folder_first else [data_part, folder_part]
    body = b"".join(parts) + f"--{FORM_BOUNDARY}--\r\n".encode()
    return body, f"multipart/form-data; boundary={FORM_BOUNDARY}"


@pytest.fixture(scope="session")
def private_dockerd() -> Iterator[PrivateDockerd]:
    """One private dockerd for the whole session; skipped (failed in CI) where it cannot run."""
    reason = PrivateDockerd.available()
    if reason:
        skip_or_fail(reason)
    daemon = PrivateDockerd()
    try:
        daemon.start()
    except DockerdError as exc:
        daemon.stop()
        skip_or_fail(f"the private dockerd did not start: {exc}")
    yield daemon
    daemon.stop()


@pytest.fixture(scope="session")
def docker_api(private_dockerd: PrivateDockerd) -> Iterator[Any]:
    """A docker.APIClient for the private dockerd."""
    api = private_dockerd.api()
    yield api
    api.close()


@pytest.fixture(scope="session")
def image_archive(
    private_dockerd: PrivateDockerd, tmp_path_factory: pytest.TempPathFactory
) -> ArchiveInfo:
    """The seven stack images, `latest`, encrypted with ARCHIVE_FRAGMENT; not left in the daemon."""
    tags = build_stack_images(private_dockerd, "latest")
    path = tmp_path_factory.mktemp("archive") / "images.enc"
    info = write_archive(private_dockerd, tags, ARCHIVE_FRAGMENT, path)
    remove_images(private_dockerd, tags)
    return info


@pytest.fixture
def no_stack_images(private_dockerd: PrivateDockerd) -> Iterator[list[str]]:
    """The stack's `latest` tags, absent from the private dockerd before and after the test."""
    tags = stack_tags("latest")
    remove_images(private_dockerd, tags)
    yield tags
    remove_images(private_dockerd, tags)


# ---- end ----


Spawn = Callable[..., Any]


class NotifyListener:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[str] = []

    async def next(self, timeout: float = 10.0) -> str:
        data = await asyncio.wait_for(
            asyncio.get_running_loop().sock_recv(self.sock, 4096), timeout
        )
        message = data.decode()
        self.messages.append(message)
        return message

    def drain(self) -> list[str]:
        """Every message received so far, the ones not yet read included."""
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return self.messages
            self.messages.append(data.decode())

    async def collect(self) -> None:
        """Read every message as it comes, until cancelled: the sender never finds the
        queue full (it would block)."""
        while True:
            await self.next(timeout=3600)

    async def wait_for(self, field: str, timeout: float = 10.0) -> str:
        """The next message that carries `field`, e.g. READY=1."""
        deadline = time.monotonic() + timeout
        while True:
            message = await self.next(max(0.0, deadline - time.monotonic()))
            if field in message.split("\n"):
                return message

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(short_dir: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(short_dir / "notify.sock")
    yield listener
    listener.close()


@pytest.fixture
async def spawn() -> AsyncIterator[Spawn]:
    """Start processes; whatever is still running at the end is killed."""
    procs: list[asyncio.subprocess.Process] = []

    async def start(*argv: str, env: dict[str, str]) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def session_for(path: Path) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path)))


async def get_health(path: Path) -> Any:
    async with session_for(path) as session, session.get("http://loader/health") as resp:
        assert resp.status == 200
        return await resp.json()


async def stop(proc: asyncio.subprocess.Process) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


@pytest.fixture(scope="session")
def big_archive(
    private_dockerd: PrivateDockerd, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ArchiveInfo]:
    """An archive big enough for a load to take a while: faults can land in its middle.
    The one big archive of the suite: tests/ and tests/faults/ share it."""
    tags = build_stack_images(private_dockerd, "latest", payload_bytes=300 * 2**20)
    path = tmp_path_factory.mktemp("big") / "images.enc"
    info = write_archive(private_dockerd, tags, ARCHIVE_FRAGMENT, path)
    remove_images(private_dockerd, tags)
    yield info
    path.unlink()
