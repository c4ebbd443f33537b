"""The fault matrix's shared parts: small timeouts, a client that never waits forever, the
daemon as a process with its stderr in a file, and the check that ends every row.

Every row asserts three things:
(1) the caller gets a clear answer, in time: `assert_clear_error`, and `Client`'s deadlines;
(2) the daemon still serves: `Scene.assert_after` asks /health;
(3) nothing is lost or left behind: `Scene.assert_after` looks for partial files, stale
    temporary files and plaintext under the cache and temp folders, for cache entries that
    differ from the CDN, and for half a stack of images in the private dockerd.
"""

from __future__ import annotations

import asyncio
import io
import json
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

from loader.settings import Settings
from tests.conftest import (
    EMAIL,
    PASSWORD,
    LocalApp,
    RunningEmulator,
    archive_ids,
    cached_big_part,
    daemon_env,
    loader_command,
    raw_request,
    socket_answers,
    upload_form,
    wait_for,
)
from tests.dockerd import (
    PrivateDockerd,
    image_ids,
    present_images,
    stack_tags,
)
from tests.emulator import Emulator

T = TypeVar("T")
FOLDER = "models"
MiB = 1 << 20
# Small timeouts: a fault must end in an answer within seconds.
FAST: dict[str, Any] = {
    "connect_timeout": 1.0,
    "api_timeout": 2.0,
    "read_timeout": 2.0,
    "api_retries": 2,
    "shutdown_grace": 3.0,
}
# The most a call may take with FAST settings and every retry spent: each attempt's
# timeout, the backoff between attempts (at most 0.5 s, then 1 s), and some slack.
FAST_LIMIT = 3 * 2.0 + 1.5 + 3.0
STACK = stack_tags("latest")
# A tar header's magic: a decrypted image archive on disk would carry it.
_TAR_MAGIC = b"ustar"


# ---- answers --------------------------------------------------------------------------


def assert_clear_error(
    status: int,
    body: bytes,
    expected: int,
    code: str | None = None,
    says: str | None = None,
) -> dict[str, str]:
    """An error answer of the expected status, in the `{"detail", "code"}` shape, no traceback."""
    assert status == expected, (status, body[:500])
    answer = json.loads(body)
    assert isinstance(answer, dict), answer
    assert set(answer) == {"detail", "code"}, answer
    assert isinstance(answer["detail"], str), answer
    assert answer["detail"].strip(), answer
    assert isinstance(answer["code"], str), answer
    assert answer["code"], answer
    assert "Traceback" not in answer["detail"], answer
    assert answer["code"] != "internal-error", answer
    if code is not None:
        assert answer["code"] == code, answer
    if says is not None:
        assert says in answer["detail"], answer
    return answer


@dataclass
class Loaded:
    """What /load answered: a status, the body as far as it came, and whether it was cut."""

    status: int
    body: bytes
    cut: bool
    content_length: int | None


class Client:
    """A caller on the daemon's socket whose every call has a deadline.

    `answers` keeps every body it received, for the secrets scan.
    """

    def __init__(self, socket: Path, limit: float = FAST_LIMIT) -> None:
        self.socket = socket
        self.limit = limit
        self.answers: list[bytes] = []
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(self.socket), limit=0)
            )
        return self._session

    async def within(self, what: str, call: Awaitable[T], limit: float | None = None) -> T:
        """`call`'s result, or a test failure once `limit` seconds (default: the client's) pass."""
        seconds = self.limit if limit is None else limit
        try:
            return await asyncio.wait_for(call, seconds)
        except asyncio.TimeoutError:
            pytest.fail(f"no answer to {what} within {seconds:.1f} s: the daemon hangs")

    async def request(
        self, method: str, path: str, *, limit: float | None = None, **kwargs: Any
    ) -> tuple[int, bytes]:
        async def call() -> tuple[int, bytes]:
            async with self.session.request(method, "http://loader" + path, **kwargs) as resp:
                return resp.status, await resp.read()

        status, body = await self.within(f"{method} {path}", call(), limit)
        self.answers.append(body)
        return status, body

    async def health(self) -> None:
        status, body = await self.request("GET", "/health", limit=5.0)
        assert (status, json.loads(body)) == (200, {"status": "healthy"})

    async def login(self, password: str = PASSWORD, **kwargs: Any) -> tuple[int, bytes]:
        return await self.request(
            "POST", "/login", json={"email": EMAIL, "password": password}, **kwargs
        )

    async def upload(
        self, name: str, data: bytes, folder: str = FOLDER, **kwargs: Any
    ) -> tuple[int, bytes]:
        body, content_type = upload_form(data, folder)
        return await self.request(
            "POST",
            f"/upload/{name}",
            data=io.BytesIO(body),
            headers={"Content-Type": content_type},
            **kwargs,
        )

    async def load(self, name: str, folder: str = FOLDER, limit: float | None = None) -> Loaded:
        async def call() -> Loaded:
            body = bytearray()
            cut = False
            async with self.session.post(
                f"http://loader/load/{name}", json={"filename": name, "folder": folder}
            ) as resp:
                try:
                    async for chunk in resp.content.iter_chunked(1 << 16):
                        body += chunk
                except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
                    cut = True
                length = resp.content_length
            if length is not None and len(body) != length:
                cut = True
            return Loaded(resp.status, bytes(body), cut, length)

        loaded = await self.within(f"/load/{name}", call(), limit)
        if loaded.status != 200:
            self.answers.append(loaded.body)
        return loaded

    async def unlock(self, password: str = PASSWORD) -> tuple[int, bytes]:
        return await self.request("POST", "/unlock", json={"email": EMAIL, "password": password})

    async def unlock_status(self) -> dict[str, Any]:
        status, body = await self.request("GET", "/unlock/status", limit=5.0)
        assert status == 200, body
        answer: dict[str, Any] = json.loads(body)
        return answer

    async def settled(self, timeout: float = 120.0) -> dict[str, Any]:
        """The unlock status once it is ready or failed."""

        async def done() -> dict[str, Any] | None:
            status = await self.unlock_status()
            return status if status["state"] in ("ready", "error") else None

        result: dict[str, Any] = await wait_for(done, timeout, "the unlock to settle")
        return result

    async def loading(self) -> dict[str, Any]:
        """The unlock status once Docker is being fed, before the end of the archive."""

        async def feeding() -> dict[str, Any] | None:
            status = await self.unlock_status()
            assert status["state"] != "error", status
            under_way = status["state"] == "loading_images" and status["bytesDone"] > 0
            return status if under_way and status["bytesDone"] < status["bytesTotal"] else None

        result: dict[str, Any] = await wait_for(feeding, 60, "the load to be under way")
        return result


# ---- what a row leaves behind ---------------------------------------------------------


def _probes(plaintext: bytes) -> list[bytes]:
    """Pieces of a plaintext that would give it away in a file (random data: no false hits)."""
    if len(plaintext) < 32:
        return []
    size = min(64, len(plaintext))
    middle = len(plaintext) // 2
    return [plaintext[:size], plaintext[middle : middle + size], plaintext[-size:]]


def files_under(*roots: Path) -> list[Path]:
    found: list[Path] = []
    for root in roots:
        if root.exists():
            found.extend(p for p in root.rglob("*") if not p.is_dir())
    return sorted(found)


def partial_files(*roots: Path) -> list[Path]:
    return [p for p in files_under(*roots) if p.name.endswith(".part")]


def leftovers(
    cache: Path, scratch: Path, plaintexts: Iterable[bytes] = (), roots: Iterable[Path] = ()
) -> list[str]:
    """Everything that should not be there: partial and temp files, plaintext anywhere."""
    probes = [probe for plaintext in plaintexts for probe in _probes(plaintext)]
    problems = [f"stale temporary file {p}" for p in files_under(scratch)]
    for path in files_under(cache, scratch, *roots):
        if path.name.endswith(".part") or path.name.startswith(".incoming-"):
            problems.append(f"partial file {path}")
        if not path.is_file():
            continue
        data = path.read_bytes()
        if _TAR_MAGIC in data:
            problems.append(f"{path} holds a tar header: decrypted images on disk")
        if any(probe in data for probe in probes):
            problems.append(f"{path} holds plaintext")
    return problems


def cache_mismatches(cache: Path, emulator: Emulator) -> list[str]:
    """Cache entries that are not the CDN's big part, byte for byte."""
    problems = []
    for entry in files_under(cache):
        if entry.parent.parent != cache or not entry.name.endswith(".big"):
            problems.append(f"unexpected file in the cache: {entry}")
            continue
        folder, name = entry.parent.name, entry.name[: -len(".big")]
        cdn = emulator.store.big_path(folder, name)
        if not cdn.exists() or cdn.read_bytes() != cached_big_part(entry):
            problems.append(f"the cache entry {entry} is not the CDN's big part")
    return problems


def half_stack(
    dockerd: PrivateDockerd | None, images: bool | None = None, archive: Path | None = None
) -> list[str]:
    """Half a stack in Docker; `images` True: all seven expected, False: none, None: all or
    none. With an `archive`, each image there must have the archive's ID, and with `images`
    None any part of the stack may be there (an unlock cut short keeps what it completed)."""
    if dockerd is None:
        return []
    present = present_images(dockerd, STACK)
    problems = []
    if archive is not None:
        expected = archive_ids(archive)
        for tag, found in image_ids(dockerd, present).items():
            if found != expected[tag]:
                problems.append(f"Docker holds {tag} as {found}, not as {expected[tag]}")
        if images is None:
            return problems
    if images is None and len(present) in (0, len(STACK)):
        return problems
    expected_tags = STACK if images else []
    if present != expected_tags:
        problems.append(f"Docker holds {present}, expected {expected_tags}")
    return problems


@dataclass
class Scene:
    """One daemon under test (in-process or a process) and what it may touch."""

    socket: Path
    cache: Path
    scratch: Path
    emulator: Emulator
    dockerd: PrivateDockerd | None = None
    clients: list[Client] = field(default_factory=list)

    def client(self, limit: float = FAST_LIMIT) -> Client:
        client = Client(self.socket, limit)
        self.clients.append(client)
        return client

    async def assert_after(
        self, *plaintexts: bytes, images: bool | None = None, archive: Path | None = None
    ) -> None:
        """(2) still serving, and (3) nothing partial, stale, decrypted or half-loaded left."""
        async with Client(self.socket) as probe:
            await probe.health()
        self.assert_clean(*plaintexts, images=images, archive=archive)

    def assert_clean(
        self, *plaintexts: bytes, images: bool | None = None, archive: Path | None = None
    ) -> None:
        """(3) alone, for a daemon that has stopped."""
        problems = leftovers(self.cache, self.scratch, plaintexts)
        problems += cache_mismatches(self.cache, self.emulator)
        problems += half_stack(self.dockerd, images, archive)
        assert not problems, "\n".join(problems)

    async def close(self) -> None:
        for client in self.clients:
            await client.close()


# ---- fixtures -------------------------------------------------------------------------


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The temp folder of the daemon under test: TMPDIR of a process, tempfile's in-process."""
    path = tmp_path / "scratch"
    path.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    return path


@pytest.fixture
def fast(with_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    """Settings with FAST timeouts, and any change."""

    def build(**changes: Any) -> Settings:
        return with_settings(**{**FAST, **changes})

    return build


StartApp = Callable[..., Any]


@pytest.fixture
async def start_app(
    make_local_app: Callable[[Settings], Any],
    fast: Callable[..., Settings],
    emulator: RunningEmulator,
    scratch: Path,
) -> AsyncIterator[StartApp]:
    """The app in-process on its socket: `await start_app(dockerd=None, **settings_changes)`."""
    scenes: list[Scene] = []

    async def start(dockerd: PrivateDockerd | None = None, **changes: Any) -> Scene:
        if dockerd is not None:
            changes.setdefault("docker_host", dockerd.host)
        settings = fast(**changes)
        app: LocalApp = await make_local_app(settings)
        scene = Scene(app.socket, settings.model_cache_dir, scratch, emulator.emulator, dockerd)
        scenes.append(scene)
        return scene

    yield start
    for scene in scenes:
        await scene.close()


def env_for(settings: Settings, scratch: Path, **extra: str) -> dict[str, str]:
    """A daemon process's environment: every setting, and TMPDIR in the test's scratch."""
    env = daemon_env(
        settings,
        READ_TIMEOUT=str(settings.read_timeout),
        MAX_UPLOAD_BYTES=str(settings.max_upload_bytes),
        LOG_LEVEL=settings.log_level,
        TMPDIR=str(scratch),
    )
    if settings.docker_host:
        env["DOCKER_HOST"] = settings.docker_host
    else:
        env.pop("DOCKER_HOST", None)
    env.update(extra)
    return env


@dataclass
class Daemon:
    """`azaion-loader serve` as a process; its stderr goes to `log_path`."""

    proc: asyncio.subprocess.Process
    scene: Scene
    log_path: Path
    settings: Settings

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def serving(self, timeout: float = 20.0) -> None:
        """Once /health answers: the socket listens before the app is set up."""

        async def up() -> bool:
            if self.proc.returncode is not None:
                pytest.fail(f"the daemon exited with {self.proc.returncode}:\n{self.log()}")
            if not socket_answers(self.scene.socket):
                return False
            try:
                status, _ = await asyncio.wait_for(
                    raw_request(self.scene.socket, "GET", "/health"), 5
                )
            except (OSError, asyncio.TimeoutError):
                return False
            return status == 200

        await wait_for(up, timeout, "the daemon to serve")

    async def exited(self, timeout: float) -> int:
        started = time.monotonic()
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout)
        except asyncio.TimeoutError:
            pytest.fail(f"the daemon did not exit within {timeout} s:\n{self.log()[-3000:]}")
        assert time.monotonic() - started <= timeout
        return code

    async def terminate(self, timeout: float) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return await self.exited(timeout)

    async def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert await self.exited(10) == -signal.SIGKILL


StartDaemon = Callable[..., Any]


@pytest.fixture
async def start_daemon(
    fast: Callable[..., Settings],
    emulator: RunningEmulator,
    scratch: Path,
    tmp_path: Path,
) -> AsyncIterator[StartDaemon]:
    """`await start_daemon(dockerd=None, env={...}, **settings_changes)`: a serving daemon
    process. Several may run one after another on the same socket; all are killed at the end."""
    daemons: list[Daemon] = []

    async def start(
        dockerd: PrivateDockerd | None = None, env: Mapping[str, str] | None = None, **changes: Any
    ) -> Daemon:
        if dockerd is not None:
            changes.setdefault("docker_host", dockerd.host)
        settings = fast(**changes)
        log_path = tmp_path / f"daemon-{len(daemons) + 1}.log"
        log = log_path.open("wb")  # the child holds it; ours is closed once it started
        try:
            proc = await asyncio.create_subprocess_exec(
                *loader_command(),
                "serve",
                env=env_for(settings, scratch, **(env or {})),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=log,
            )
        finally:
            log.close()
        scene = Scene(
            settings.socket_path, settings.model_cache_dir, scratch, emulator.emulator, dockerd
        )
        daemon = Daemon(proc, scene, log_path, settings)
        daemons.append(daemon)
        await daemon.serving()
        return daemon

    yield start
    for daemon in daemons:
        await daemon.scene.close()
        if daemon.running:
            daemon.proc.kill()
            await daemon.proc.wait()


@pytest.fixture
def dockerd_back(private_dockerd: PrivateDockerd) -> Iterator[PrivateDockerd]:
    """The private dockerd, started again at the end if a test killed it."""
    yield private_dockerd
    if not private_dockerd.running:
        private_dockerd.start()
