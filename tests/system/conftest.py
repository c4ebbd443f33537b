"""The package under test, a Debian 12 root booted under systemd-nspawn, and a client inside it.

Building the two .debs (this tree, and the same as a newer version to upgrade to) runs
alongside making the root: `scripts/debian-root` caches the debootstrapped root under
AZAION_TEST_CACHE (default /var/cache/azaion-loader-tests), and each session boots a copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from loader import __version__
from tests.conftest import ARCHIVE_FRAGMENT, EMAIL, PASSWORD, skip_or_fail
from tests.dockerd import PrivateDockerd
from tests.system.machine import Machine

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("AZAION_TEST_CACHE", "/var/cache/azaion-loader-tests"))
UPGRADE_VERSION = f"{__version__}+test1"
DEB_DIR = "/root/debs"
CLIENT = "/usr/local/bin/loader-request"

# A client for the loader's socket inside the container, on the Python the package pulls in:
# loader-request METHOD PATH [JSON] prints {"status": .., "body": ..} or {"error": ..}.
CLIENT_SOURCE = """\
#!/usr/bin/python3
import http.client, json, socket, sys

class UnixConnection(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect("/run/azaion-loader.sock")

method, path = sys.argv[1], sys.argv[2]
body = sys.argv[3] if len(sys.argv) > 3 else None
connection = UnixConnection("loader", timeout=60)
try:
    connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
    answer = connection.getresponse()
    print(json.dumps({"status": answer.status, "body": answer.read().decode()}))
except OSError as exc:
    print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
"""


# Where upload_then_load's model is cached inside.
CACHED_MODEL = "/var/cache/azaion-loader/models/models/model.onnx"


@dataclass(frozen=True)
class Packages:
    deb: Path
    upgrade_deb: Path
    changes: Path


@dataclass
class Booted:
    """The booted machine and the packages, as the container sees them."""

    machine: Machine
    packages: Packages

    @property
    def deb(self) -> str:
        return f"{DEB_DIR}/{self.packages.deb.name}"

    @property
    def upgrade_deb(self) -> str:
        return f"{DEB_DIR}/{self.packages.upgrade_deb.name}"

    def request(
        self, method: str, path: str, body: object = None, user: str | None = None
    ) -> dict[str, object]:
        """An HTTP request to the loader's socket from inside, as root or as `user`."""
        args = [CLIENT, method, path] + ([json.dumps(body)] if body is not None else [])
        if user is not None:
            args = ["runuser", "-u", user, "--", *args]
        answer: dict[str, object] = json.loads(self.machine.run(*args).stdout)
        return answer

    def upload_then_load(self, model: bytes, timeout: float = 120.0) -> None:
        """With the CLI inside, logged in: `model` uploaded as models/model.onnx, its cached
        big part dropped, then loaded twice (from the CDN, then from the cache), each time
        the same bytes."""
        machine = self.machine
        (machine.root / "root/model.onnx").write_bytes(model)
        cli = ("azaion-loader",)
        login = (*cli, "login", "--email", EMAIL, "--password-stdin")
        machine.run(*login, input=PASSWORD + "\n", timeout=timeout)
        machine.run(*cli, "upload", "/root/model.onnx", "--folder", "models", timeout=timeout)
        machine.run("rm", "-f", f"{CACHED_MODEL}.big")
        for _ in range(2):  # from the CDN, then from the cache
            load = (*cli, "load", "models/model.onnx", "-o", "/root/copy.onnx")
            machine.run(*load, timeout=timeout)
            assert (machine.root / "root/copy.onnx").read_bytes() == model

    def metrics(self) -> dict[str, float]:
        """`azaion-loader metrics` inside, read by prometheus_client's parser: each sample's
        value under its name and labels, e.g. `azaion_loader_resource_loads_total{source=cdn}`."""
        text = self.machine.run("azaion-loader", "metrics").stdout
        return {
            sample.name
            + "{"
            + ",".join(f"{key}={value}" for key, value in sorted(sample.labels.items()))
            + "}": sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def install(self, deb: str) -> None:
        """apt installs `deb` and its dependencies from Debian's archive."""
        command = ("apt-get", "install", "-y", "-q", "--no-install-recommends", deb)
        if self.machine.run(*command, check=False).returncode != 0:
            # The cached root's package lists may be older than the archive.
            self.machine.run("apt-get", "update", "-q")
            self.machine.run(*command)

    def package_state(self) -> str:
        """dpkg's status of azaion-loader: "installed 0.1.0", "config-files 0.1.0", or ""."""
        result = self.machine.run(
            "dpkg-query", "-W", "-f", "${db:Status-Status} ${Version}", "azaion-loader", check=False
        )
        return result.stdout.strip() if result.returncode == 0 else ""


def _require_tools() -> None:
    if os.geteuid() != 0:
        skip_or_fail("booting Debian under systemd-nspawn needs root")
    for tool in ("systemd-nspawn", "debootstrap", "nsenter", "git"):
        if shutil.which(tool) is None:
            skip_or_fail(f"{tool} is not installed")


def _check(process: subprocess.Popen[bytes], log: Path, what: str) -> None:
    if process.wait() != 0:
        tail = log.read_bytes()[-4000:].decode(errors="replace")
        pytest.fail(f"{what} failed with {process.returncode}:\n{tail}", pytrace=False)


@pytest.fixture(scope="session")
def work_dir() -> Iterator[Path]:
    """Scratch space for the session: the root copy alone is some 350 MB, so never kept."""
    _require_tools()
    path = Path(tempfile.mkdtemp(prefix="azaion-loader-system-", dir="/var/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# Where the host's test dockerd's folder appears inside: its socket's folder, not the
# socket itself, so that a restarted dockerd's new socket shows through.
DOCKER_DIR = "/run/host-docker"


@pytest.fixture(scope="session")
def machine_options(private_dockerd: PrivateDockerd) -> dict[str, Any]:
    """Extra arguments of `Machine`: `binds` (`--bind=` values), `setenv`, `env`, `nspawn_args`.

    The host's private dockerd is bound in, for the unlock inside the booted system.
    """
    return {"binds": [f"{private_dockerd.socket.parent}:{DOCKER_DIR}"]}


def build_packages(work_dir: Path) -> subprocess.Popen[bytes]:
    """Start building the two .debs (this tree, and the same as a newer version to upgrade
    to) into `work_dir`/deb and `work_dir`/upgrade; its log is `work_dir`/build.log."""
    build_deb = REPO / "scripts" / "build-deb"
    with open(work_dir / "build.log", "wb") as blog:
        return subprocess.Popen(
            [
                "sh",
                "-ec",
                '"$0" --out "$1" --no-lintian; "$0" --out "$2" --version "$3" --no-lintian',
                build_deb,
                work_dir / "deb",
                work_dir / "upgrade",
                UPGRADE_VERSION,
            ],
            stdout=blog,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def make_root(root: Path, log: Path, *options: str) -> subprocess.Popen[bytes]:
    """Start `scripts/debian-root` (cached) into `root`, with `options` (--suite, ...)."""
    with open(log, "wb") as rlog:
        return subprocess.Popen(
            [REPO / "scripts" / "debian-root", "--cache", CACHE, *options, root],
            stdout=rlog,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


@pytest.fixture(scope="session")
def packages(work_dir: Path) -> Packages:
    """The two .debs, built once for every booted Debian of the session (`booted` may
    have built them already, beside making its root)."""
    if list((work_dir / "upgrade").glob("azaion-loader_*_all.deb")):
        return _packages(work_dir)
    builds = build_packages(work_dir)
    builds.wait()
    _check(builds, work_dir / "build.log", "scripts/build-deb")
    return _packages(work_dir)


def _packages(work_dir: Path) -> Packages:
    return Packages(
        deb=next((work_dir / "deb").glob("azaion-loader_*_all.deb")),
        upgrade_deb=next((work_dir / "upgrade").glob("azaion-loader_*_all.deb")),
        changes=next((work_dir / "deb").glob("azaion-loader_*.changes")),
    )


def put_packages(root: Path, packages: Packages) -> None:
    """The .debs under DEB_DIR, and the socket client, in the root."""
    (root / DEB_DIR.lstrip("/")).mkdir(parents=True, exist_ok=True)
    for deb in (packages.deb, packages.upgrade_deb):
        shutil.copy(deb, root / DEB_DIR.lstrip("/"))
    client = root / CLIENT.lstrip("/")
    client.parent.mkdir(parents=True, exist_ok=True)
    client.write_text(CLIENT_SOURCE)
    client.chmod(0o755)


@pytest.fixture(scope="session")
def booted(work_dir: Path, machine_options: dict[str, Any]) -> Iterator[Booted]:
    """The current tree's package and the Debian 12 root, made side by side; then the boot."""
    root = work_dir / "root"
    root_log = work_dir / "root.log"
    builds = build_packages(work_dir)
    making_root = make_root(root, root_log)
    for process in (making_root, builds):
        process.wait()
    _check(making_root, root_log, "scripts/debian-root")
    _check(builds, work_dir / "build.log", "scripts/build-deb")
    packages = _packages(work_dir)
    put_packages(root, packages)

    machine = Machine(root, work_dir / "nspawn.log", **machine_options)
    try:
        machine.boot()
        yield Booted(machine, packages)
    finally:
        machine.shutdown()


@pytest.fixture
def emulator_url() -> Iterator[str]:
    """The Resource API emulator on the host's loopback, which the container shares."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.emulator",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--user",
            f"{EMAIL}:{PASSWORD}",
            "--archive-fragment-hex",
            ARCHIVE_FRAGMENT.hex(),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert "listening on http://" in line, f"the emulator said {line!r}"
        yield line.rsplit(" ", 1)[-1].strip()
    finally:
        process.terminate()
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()
