"""What the parts run against, each made on first use and torn down by `Bench.close`:
the work folder, a private dockerd, the image archive, the emulator, the daemon under test."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from bench import make_archive
from bench.harness import (
    MB,
    BenchError,
    Child,
    answers_health,
    io_counters,
    peak_rss_mb,
    rss_mb,
    wait_quiet,
)
from loader.crypto import IV_SIZE, key_from_fragment
from tests.dockerd import STACK_NAMES, PrivateDockerd, remove_images
from tests.polling import poll

EMAIL = "bench@azaion.local"
PASSWORD = "bench-password"
ARCHIVE_FRAGMENT = b"bench-archive-fragment"
RESOURCE_FRAGMENT = b"bench-resource-fragment"
VERSION = "bench"
FOLDER = "bench"
RESOURCE_NAME = "model.bin"
# A tiny resource whose upload and load warm a fresh daemon up (imports, connections).
WARMUP_NAME = "warmup.bin"
START_TIMEOUT = 30.0
# The bench stack: like real ones, the images share a base (a runtime, CUDA, ROS) of about
# 40% of the bytes, and each adds a layer of its own.
BASE_SHARE = 0.4


def loader_argv() -> list[str]:
    """The daemon as installed beside this Python (its console script), else `-m loader`."""
    script = Path(sys.executable).with_name("azaion-loader")
    if script.exists():
        return [str(script), "serve"]
    return [sys.executable, "-m", "loader", "serve"]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without anything that would change how a daemon starts."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("LISTEN_", "NOTIFY_SOCKET", "WATCHDOG_", "DOCKER_"))
    }
    env.update(extra)
    return env


def daemon_env(**extra: str) -> dict[str, str]:
    """`clean_env`, with the malloc arenas the unit gives the daemon (a MALLOC_ARENA_MAX
    set here wins, to compare)."""
    env = clean_env(**extra)
    env.setdefault("MALLOC_ARENA_MAX", unit_environment()["MALLOC_ARENA_MAX"])
    return env


def unit_environment() -> dict[str, str]:
    """The variables azaion-loader.service sets with Environment=."""
    unit = Path(__file__).resolve().parents[1] / "systemd" / "azaion-loader.service"
    found: dict[str, str] = {}
    for line in unit.read_text().splitlines():
        if line.startswith("Environment="):
            name, _, value = line.removeprefix("Environment=").partition("=")
            found[name] = value
    return found


class BenchDockerd(PrivateDockerd):
    """A private dockerd that also dies if the bench is killed outright."""

    def command(self) -> list[str]:
        prefix = ["setpriv", "--pdeathsig", "TERM"] if shutil.which("setpriv") else []
        return [*prefix, *super().command()]


@dataclass(frozen=True)
class Archive:
    path: Path
    plain: Path
    tags: list[str]
    fragment: bytes
    size: int
    plaintext_size: int

    @property
    def key(self) -> bytes:
        return key_from_fragment(self.fragment)

    @property
    def iv(self) -> bytes:
        with open(self.path, "rb") as archive:
            return archive.read(IV_SIZE)


@dataclass(frozen=True)
class Resource:
    path: Path
    size: int
    sha256: str


class Daemon:
    """azaion-loader serve, a real subprocess on its own Unix socket."""

    def __init__(self, child: Child, socket: Path) -> None:
        self.child = child
        self.socket = socket

    @property
    def pid(self) -> int:
        return self.child.pid

    def rss_mb(self) -> float:
        return rss_mb(self.pid)

    def peak_rss_mb(self) -> float:
        return peak_rss_mb(self.pid)

    def written(self) -> int:
        return io_counters(self.pid)["write_bytes"]

    def stop(self) -> None:
        code = self.child.stop()
        if code != 0:
            print(f"warning: the daemon exited with {code}\n{self.child.tail()}", file=sys.stderr)


class Bench:
    """Everything the parts share. Made lazily; `close` stops and removes all of it."""

    def __init__(self, runs: int, size_unlock: int, size_resource: int, work: Path | None) -> None:
        self.runs = runs
        self.size_unlock = size_unlock
        self.size_resource = size_resource
        self._own_work = work is None
        self.work = (
            Path(tempfile.mkdtemp(prefix="azl-bench-", dir="/var/tmp")) if work is None else work
        )
        self.work.mkdir(parents=True, exist_ok=True)
        self.models = self.work / "models"
        self.emulator_storage = _emulator_storage(self.work, size_resource)
        self.socket = self.work / "loader.sock"
        self._children: list[Child] = []
        self._dockerd: BenchDockerd | None = None
        self._emulator_url: str | None = None
        self._archive: Archive | None = None
        self._resource: Resource | None = None
        self.uploaded: set[str] = set()  # resources the emulator and the cache hold
        self.quiet_waits = 0
        self.noisy_starts = 0

    def settle(self) -> None:
        """Before a timed run: wait (a while, not forever) for the machine to be quiet."""
        self.quiet_waits += 1
        if not wait_quiet():
            self.noisy_starts += 1

    # The private dockerd

    def dockerd(self) -> PrivateDockerd:
        if self._dockerd is None:
            reason = PrivateDockerd.available()
            if reason:
                raise BenchError(f"cannot run a private dockerd: {reason}")
            daemon = BenchDockerd(self.work / "dockerd")
            started = time.monotonic()
            daemon.start()
            self._dockerd = daemon
            print(f"private dockerd on {daemon.host} in {time.monotonic() - started:.2f} s")
        return self._dockerd

    def remove_images(self, tags: list[str]) -> None:
        dockerd = self.dockerd()
        remove_images(dockerd, tags)

    # The archive

    def archive(self) -> Archive:
        if self._archive is None:
            self._archive = self._reuse_archive() or self._make_archive()
        return self._archive

    def _archive_meta(self) -> dict[str, object]:
        return {
            "size_unlock": self.size_unlock,
            "version": VERSION,
            "fragment": ARCHIVE_FRAGMENT.hex(),
            "images": list(STACK_NAMES),
            "base_share": BASE_SHARE,
        }

    def _reuse_archive(self) -> Archive | None:
        meta_path = self.work / "archive.json"
        with contextlib.suppress(OSError, ValueError, KeyError):
            meta = json.loads(meta_path.read_text())
            if meta["made_for"] == self._archive_meta():
                archive = self._archive_at(self.work / "images.enc", self.work / "images.tar")
                if archive.size == meta["size"] and archive.plaintext_size == meta["plain_size"]:
                    print(f"reusing the archive {archive.path} ({archive.size / MB:,.0f} MB)")
                    return archive
        return None

    def _make_archive(self) -> Archive:
        path, plain = self.work / "images.enc", self.work / "images.tar"
        argv = [
            f"--size={self.size_unlock}",
            f"--version={VERSION}",
            f"--fragment-hex={ARCHIVE_FRAGMENT.hex()}",
            f"--out={path}",
            f"--plain={plain}",
            f"--docker-host={self.dockerd().host}",
            f"--base-share={BASE_SHARE}",
        ]
        print(f"making the archive: make_archive.py {' '.join(argv)}")
        if make_archive.main(argv) != 0:
            raise BenchError("make_archive.py failed")
        archive = self._archive_at(path, plain)
        meta = {
            "made_for": self._archive_meta(),
            "size": archive.size,
            "plain_size": archive.plaintext_size,
        }
        (self.work / "archive.json").write_text(json.dumps(meta, indent=2))
        return archive

    def _archive_at(self, path: Path, plain: Path) -> Archive:
        return Archive(
            path=path,
            plain=plain,
            tags=[f"{name}:{VERSION}" for name in STACK_NAMES],
            fragment=ARCHIVE_FRAGMENT,
            size=path.stat().st_size,
            plaintext_size=plain.stat().st_size,
        )

    def ciphertext_only(self) -> Path:
        """The archive without its IV, for `openssl enc -d -in`."""
        archive = self.archive()
        out = self.work / "ciphertext.bin"
        if not out.exists() or out.stat().st_size != archive.size - IV_SIZE:
            with open(archive.path, "rb") as source, open(out, "wb") as sink:
                source.seek(IV_SIZE)
                shutil.copyfileobj(source, sink, 8 << 20)
        return out

    # The emulator of the Resource API and CDN

    def emulator_url(self) -> str:
        if self._emulator_url is None:
            self.emulator_storage.mkdir(exist_ok=True)
            child = self._spawn(
                "emulator",
                [
                    sys.executable,
                    "-m",
                    "tests.emulator",
                    "--port=0",
                    f"--storage={self.emulator_storage}",
                    f"--user={EMAIL}:{PASSWORD}",
                    f"--archive-fragment-hex={ARCHIVE_FRAGMENT.hex()}",
                    f"--resource-fragment-hex={RESOURCE_FRAGMENT.hex()}",
                ],
                env=clean_env(),
            )
            line = child.wait_line("emulator listening on ", START_TIMEOUT)
            self._emulator_url = line.rsplit(" ", 1)[1]
        return self._emulator_url

    # The resource for /upload and /load

    def resource(self) -> Resource:
        """A file of `size_resource` pseudo-random bytes (AES-CTR: fast, incompressible)."""
        if self._resource is None:
            path = self.work / "resource.bin"
            stream = Cipher(algorithms.AES(bytes(32)), modes.CTR(bytes(16))).encryptor()
            digest = hashlib.sha256()
            left = self.size_resource
            with open(path, "wb") as out:
                while left > 0:
                    piece = stream.update(bytes(min(left, 1 << 20)))
                    digest.update(piece)
                    out.write(piece)
                    left -= len(piece)
            self._resource = Resource(path, self.size_resource, digest.hexdigest())
        return self._resource

    # The daemon under test

    def daemon(
        self, *, cpu: int | None = None, log_level: str = "info", docker_host: str | None = None
    ) -> Daemon:
        """A fresh daemon, configured with whatever the bench has started, answering /health;
        `docker_host` names another engine than the private dockerd."""
        env = daemon_env(
            LOADER_SOCKET=str(self.socket),
            MODEL_CACHE_DIR=str(self.models),
            LOG_LEVEL=log_level,
            API_VERSION=VERSION,
        )
        if self._emulator_url is not None:
            env.update(RESOURCE_API_URL=self._emulator_url, CDN_URL=f"{self._emulator_url}/cdn")
        if docker_host is not None:
            env["DOCKER_HOST"] = docker_host
        elif self._dockerd is not None:
            env["DOCKER_HOST"] = self._dockerd.host
        if self._archive is not None:
            env["IMAGES_PATH"] = str(self._archive.path)
        child = self._spawn("daemon", loader_argv(), env=env, cpu=cpu)
        if not poll(lambda: not child.running or answers_health(self.socket), START_TIMEOUT):
            child.stop()
            raise BenchError(f"the daemon did not answer /health in {START_TIMEOUT} s")
        if not child.running:
            raise BenchError(f"the daemon exited with {child.proc.returncode}\n{child.tail()}")
        return Daemon(child, self.socket)

    def _spawn(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str],
        cpu: int | None = None,
        stdin: bool = False,
    ) -> Child:
        self._children = [c for c in self._children if c.running]
        child = Child(name, argv, env=env, cpu=cpu, stdin=stdin)
        self._children.append(child)
        return child

    def spawn(
        self, name: str, argv: list[str], *, cpu: int | None = None, stdin: bool = False
    ) -> Child:
        """Any other process the parts need (load generators), stopped by `close` too."""
        return self._spawn(name, argv, env=clean_env(), cpu=cpu, stdin=stdin)

    # Teardown

    def close(self) -> None:
        """Stop every process, then the dockerd; remove the work folder unless it was given."""
        for child in reversed(self._children):
            child.stop()
        self._children.clear()
        if self._dockerd is not None:
            started = time.monotonic()
            self._dockerd.stop()
            self._dockerd = None
            print(f"private dockerd stopped in {time.monotonic() - started:.2f} s")
        if self.emulator_storage.parent == _MEMORY:
            shutil.rmtree(self.emulator_storage, ignore_errors=True)
        if self._own_work:
            shutil.rmtree(self.work, ignore_errors=True)


# The emulator stands for a remote CDN and API: it keeps its parts in memory when there is
# room, so that its writes do not share the disk with the daemon's, as they would not on a
# device (on one disk, its file commits queue behind the daemon's fsyncs: bench/README.md).
_MEMORY = Path("/dev/shm")


def _emulator_storage(work: Path, size_resource: int) -> Path:
    with contextlib.suppress(OSError):
        if shutil.disk_usage(_MEMORY).free > 3 * size_resource + 256 * MB:
            return Path(tempfile.mkdtemp(prefix="azl-bench-emulator-", dir=_MEMORY))
    print(f"the emulator keeps its parts on disk: {_MEMORY} lacks room or is absent")
    return work / "emulator"
