"""The .deb on a booted Debian 13 ("trixie": Python 3.13, aiohttp 3.11, cryptography 43,
the Docker SDK 7.1, systemd 257, docker.io 26.1): install, socket activation, the unlock into
its own Docker 26 from archives in both `docker save` layouts, upload and load, upgrade, and
a purge that leaves nothing.

The container has a network of its own (`--private-network`): its dockerd must never run in
the host's network namespace, where it would rewrite the host's firewall and routes (and the
root's daemon.json keeps it off any network besides). So the Resource API emulator runs
inside, on the container's loopback, from a copy of tests/emulator on trixie's python3.
The tests run in file order, as the package's life goes.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from loader.crypto import key_from_fragment
from tests.blobs import encrypt
from tests.conftest import ARCHIVE_FRAGMENT, EMAIL, PASSWORD, archive_ids
from tests.dockerd import ArchiveInfo
from tests.system.conftest import (
    REPO,
    UPGRADE_VERSION,
    Booted,
    Packages,
    _check,
    make_root,
    put_packages,
)
from tests.system.machine import Machine

pytestmark = pytest.mark.system

SERVICE = "azaion-loader.service"
SOCKET = "azaion-loader.socket"
DEFAULTS = "/etc/default/azaion-loader"
ARCHIVE = "/opt/azaion/images.enc"
EMULATOR_PORT = 18080
EMULATOR = f"http://127.0.0.1:{EMULATOR_PORT}"
STACK = [
    f"azaion/{name}:latest"
    for name in (
        "annotations",
        "flights",
        "detections",
        "gps-denied-onboard",
        "gps-denied-desktop",
        "autopilot",
        "ai-training",
    )
]


@pytest.fixture(scope="module")
def trixie(work_dir: Path, packages: Packages) -> Iterator[Booted]:
    """Debian 13 with docker.io, booted with a network of its own; the package installed
    (offline: its dependencies wait in apt's archive) and the emulator serving inside."""
    root, log = work_dir / "trixie", work_dir / "trixie-root.log"
    making = make_root(root, log, "--suite", "trixie", "--with-docker")
    making.wait()
    _check(making, log, "scripts/debian-root --suite trixie --with-docker")
    put_packages(root, packages)
    code = root / "opt/azl-tests/tests"
    shutil.copytree(
        REPO / "tests" / "emulator",
        code / "emulator",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    (code / "__init__.py").write_text("")
    machine = Machine(
        root,
        work_dir / "trixie-nspawn.log",
        nspawn_args=["--private-network"],
        nspawn_env={"SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"},
    )
    try:
        machine.boot()
        booted = Booted(machine, packages)
        booted.install(booted.deb)
        _start_emulator(machine)
        yield booted
    finally:
        machine.shutdown()


def _start_emulator(machine: Machine) -> None:
    machine.run(
        "systemd-run",
        "--unit=azl-emulator",
        "--setenv=PYTHONPATH=/opt/azl-tests",
        "python3",
        "-m",
        "tests.emulator",
        "--host=127.0.0.1",
        f"--port={EMULATOR_PORT}",
        f"--user={EMAIL}:{PASSWORD}",
        f"--archive-fragment-hex={ARCHIVE_FRAGMENT.hex()}",
    )
    probe = f"import socket; socket.create_connection(('127.0.0.1', {EMULATOR_PORT}), 1)"
    machine.wait_for(
        "the emulator inside",
        lambda: machine.run("python3", "-c", probe, check=False).returncode == 0,
    )


def _use_emulator(booted: Booted) -> None:
    machine = booted.machine
    shipped = machine.run("cat", DEFAULTS).stdout
    if EMULATOR not in shipped:
        machine.write(DEFAULTS, shipped + f"RESOURCE_API_URL={EMULATOR}\nCDN_URL={EMULATOR}/cdn\n")
    machine.run("systemctl", "restart", SERVICE)


def _status(booted: Booted) -> dict[str, object]:
    answer = booted.request("GET", "/unlock/status")
    status: dict[str, object] = json.loads(str(answer["body"]))
    return status


def _unlock(booted: Booted) -> dict[str, object]:
    answer = booted.request("POST", "/unlock", {"email": EMAIL, "password": PASSWORD})
    assert answer["status"] == 200, answer
    booted.machine.wait_for(
        "the unlock to settle",
        lambda: _status(booted)["state"] in ("ready", "error"),
        timeout=180,
    )
    return _status(booted)


# trixie's docker.io comes without the CLI (docker-cli): the calls inside go through the
# Docker SDK on trixie's python3, which the package pulls in.
DOCKER_SDK = """\
import json, sys, docker
api = docker.APIClient(version="auto")
what, names = sys.argv[1], sys.argv[2:]
if what == "version":
    print(api.version()["Version"])
elif what == "ids":
    print(json.dumps({name: api.inspect_image(name)["Id"] for name in names}))
elif what == "save":
    answer = api._get(api._url("/images/get"), params={"names": names[1:]}, stream=True)
    api._raise_for_status(answer)
    with open(names[0], "wb") as out:
        for chunk in answer.iter_content(1 << 20):
            out.write(chunk)
elif what == "rmi":
    for name in names:
        api.remove_image(name)
"""


def _docker(booted: Booted, *args: str) -> str:
    return booted.machine.run("python3", "-c", DOCKER_SDK, *args).stdout


def _engine_ids(booted: Booted) -> dict[str, str]:
    ids: dict[str, str] = json.loads(_docker(booted, "ids", *STACK))
    return ids


def _put_archive(booted: Booted, data: bytes) -> Path:
    path = booted.machine.root / ARCHIVE.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    booted.machine.run("chown", "root:azaion-loader", ARCHIVE)
    booted.machine.run("chmod", "0640", ARCHIVE)
    return path


def test_installs_under_usr_lib_and_the_socket_starts_the_service(trixie: Booted) -> None:
    machine = trixie.machine
    files = machine.run("dpkg", "-L", "azaion-loader").stdout.split()
    units = [f for f in files if f.endswith((".service", ".socket"))]
    assert sorted(units) == [
        f"/usr/lib/systemd/system/{SERVICE}",
        f"/usr/lib/systemd/system/{SOCKET}",
    ], units
    assert not [f for f in files if f == "/lib" or f.startswith("/lib/")], files
    assert machine.run("systemctl", "is-active", SOCKET, check=False).stdout.strip() == "active"
    assert machine.run("systemctl", "is-active", SERVICE, check=False).stdout.strip() != "active"
    assert trixie.request("GET", "/health")["status"] == 200
    assert machine.run("systemctl", "is-active", SERVICE).stdout.strip() == "active"
    python = machine.run("python3", "-c", "import sys, aiohttp; print(sys.version_info[:2])")
    assert python.stdout.strip() == "(3, 13)", python.stdout


def test_unlocks_both_layouts_into_its_own_docker_26(
    trixie: Booted, image_archive: ArchiveInfo, tmp_path: Path
) -> None:
    """The legacy layout (the archive Docker 20.10 saved on the host), then the OCI layout
    that Docker 26 itself saves, each into an engine that lacks the stack."""
    machine = trixie.machine
    machine.run("systemctl", "start", "docker.service")
    machine.wait_for(
        "dockerd inside",
        lambda: machine.run("test", "-S", "/run/docker.sock", check=False).returncode == 0,
    )
    version = _docker(trixie, "version")
    assert version.startswith("26."), version
    _use_emulator(trixie)

    _put_archive(trixie, image_archive.path.read_bytes())
    legacy = _unlock(trixie)
    assert legacy["state"] == "ready", (legacy, machine.journal(SERVICE))
    assert _engine_ids(trixie) == archive_ids(image_archive.path)

    _docker(trixie, "save", "/root/stack.tar", *STACK)
    plain = (machine.root / "root/stack.tar").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
        names = set(tar.getnames())
    assert {"oci-layout", "index.json", "manifest.json"} <= names, sorted(names)[:10]
    oci = _put_archive(trixie, encrypt(key_from_fragment(ARCHIVE_FRAGMENT), plain))
    _docker(trixie, "rmi", *STACK)
    answer = _unlock(trixie)
    assert answer["state"] == "ready", (answer, machine.journal(SERVICE))
    assert answer["imagesDone"] == 7, answer
    assert _engine_ids(trixie) == archive_ids(oci)
    machine.run("rm", "-f", "/root/stack.tar", ARCHIVE)


def test_upload_and_load_on_trixies_libraries(trixie: Booted) -> None:
    machine = trixie.machine
    _use_emulator(trixie)
    trixie.upload_then_load(bytes(range(256)) * 9_000 + b"tail")
    # /metrics, through Debian 13's python3-prometheus-client.
    metrics = trixie.metrics()
    assert metrics["azaion_loader_resource_loads_total{source=cdn}"] == 1, metrics
    assert metrics["azaion_loader_resource_loads_total{source=cache}"] == 1, metrics
    machine.run("rm", "-f", "/root/model.onnx", "/root/copy.onnx")


def test_upgrade_then_purge_leaves_nothing(trixie: Booted) -> None:
    machine = trixie.machine
    trixie.install(trixie.upgrade_deb)
    assert trixie.package_state() == f"installed {UPGRADE_VERSION}"
    assert trixie.request("GET", "/health")["status"] == 200
    purge = machine.run("apt-get", "purge", "-y", "-q", "azaion-loader")
    said = purge.stdout + purge.stderr
    assert "not empty so not removed" not in said, said
    assert trixie.package_state() == ""
    for path in (
        "/var/lib/azaion-loader",
        "/var/cache/azaion-loader",
        DEFAULTS,
        "/run/azaion-loader.sock",
        f"/usr/lib/systemd/system/{SOCKET}",
        f"/usr/lib/systemd/system/{SERVICE}",
        f"/etc/systemd/system/sockets.target.wants/{SOCKET}",
    ):
        assert machine.run("test", "-e", path, check=False).returncode != 0, path
