"""The .deb on a booted arm64 Debian 12, every binary in it run by qemu-user-static: install,
socket activation, login, upload and load with the CLI.

Slow (the root's debootstrap some 3 minutes, the install 3 more, all under emulation), so
outside the default run: `make test-arm64`. The root is cached like the Debian 12 one
(`scripts/debian-root --arch arm64`). The container shares the host's network, so the
Resource API emulator runs on the host's loopback, as for the Debian 12 tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import EMAIL, PASSWORD, skip_or_fail
from tests.system.conftest import Booted, Packages, _check, make_root, put_packages
from tests.system.machine import Machine, MachineError

pytestmark = pytest.mark.system

SERVICE = "azaion-loader.service"
SOCKET = "azaion-loader.socket"
DEFAULTS = "/etc/default/azaion-loader"
BINFMT = Path("/proc/sys/fs/binfmt_misc")
# Debian's qemu-user-static registration (systemd-binfmt reads it at boot); its flags
# are OPF.
BINFMT_CONF = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")
# Under emulation everything is some ten times slower than on the host.
SLOW = 900.0


def register_aarch64() -> None:
    """binfmt_misc runs aarch64 binaries with qemu-user-static, with the F flag: the kernel
    opens the emulator at registration, so it runs inside the container's root too."""
    if not BINFMT_CONF.exists():
        skip_or_fail(f"{BINFMT_CONF} is missing: install qemu-user-static")
    if not (BINFMT / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", BINFMT], check=True)
    entry = BINFMT / "qemu-aarch64"
    if entry.exists() and not _has_f_flag(entry):
        entry.write_text("-1")  # registered without F: replaced
    if not entry.exists():
        lines = [line for line in BINFMT_CONF.read_text().splitlines() if line.startswith(":")]
        (BINFMT / "register").write_text(lines[0])
    assert _has_f_flag(entry), entry.read_text()


def _has_f_flag(entry: Path) -> bool:
    flags = [line for line in entry.read_text().splitlines() if line.startswith("flags:")]
    return bool(flags) and "F" in flags[0].split(":", 1)[1]


@pytest.fixture(scope="module")
def arm64(work_dir: Path, request: pytest.FixtureRequest) -> Iterator[Booted]:
    """Debian 12 arm64, booted in the host's network, with the package installed (offline:
    its dependencies wait in apt's archive). The root is made while the .debs build."""
    if shutil.which("qemu-aarch64-static") is None:
        skip_or_fail("qemu-user-static is not installed")
    register_aarch64()
    root, log = work_dir / "arm64", work_dir / "arm64-root.log"
    making = make_root(root, log, "--arch", "arm64")
    packages: Packages = request.getfixturevalue("packages")
    making.wait()
    _check(making, log, "scripts/debian-root --arch arm64")
    put_packages(root, packages)
    machine = Machine(root, work_dir / "arm64-nspawn.log")
    try:
        machine.boot(timeout=300)
        booted = Booted(machine, packages)
        install = ("apt-get", "install", "-y", "-q", "--no-install-recommends", booted.deb)
        if machine.run(*install, check=False, timeout=SLOW).returncode != 0:
            # The cached root's package lists may be older than the archive.
            machine.run("apt-get", "update", "-q", timeout=SLOW)
            machine.run(*install, timeout=SLOW)
        yield booted
    finally:
        # qemu-user renumbers the real-time signals, so Machine.shutdown's SIGRTMIN+4 does
        # not reach the emulated init as a power-off: it is asked from inside first.
        leader = machine.leader
        if leader is not None:
            machine.run("systemctl", "poweroff", "--no-block", check=False, timeout=60)
            with contextlib.suppress(MachineError):
                machine.wait_for(
                    "the power-off",
                    lambda: not Path(f"/proc/{leader}").exists(),
                    timeout=120,
                )
        machine.shutdown(timeout=30)


def test_runs_on_aarch64_and_the_socket_starts_the_service(arm64: Booted) -> None:
    machine = arm64.machine
    assert machine.run("uname", "-m").stdout.strip() == "aarch64"
    assert machine.run("dpkg", "--print-architecture").stdout.strip() == "arm64"
    assert machine.run("systemctl", "is-active", SOCKET, check=False).stdout.strip() == "active"
    assert arm64.request("GET", "/health")["status"] == 200
    assert machine.run("systemctl", "is-active", SERVICE).stdout.strip() == "active"


def test_login_upload_and_load_with_the_cli(arm64: Booted, emulator_url: str) -> None:
    machine = arm64.machine
    shipped = machine.run("cat", DEFAULTS).stdout
    machine.write(
        DEFAULTS, shipped + f"RESOURCE_API_URL={emulator_url}\nCDN_URL={emulator_url}/cdn\n"
    )
    try:
        machine.run("systemctl", "restart", SERVICE, timeout=SLOW)
        wrong = arm64.request("POST", "/login", {"email": EMAIL, "password": "wrong"})
        assert wrong["status"] == 401, wrong
        answer = arm64.request("POST", "/login", {"email": EMAIL, "password": PASSWORD})
        assert answer["status"] == 200, (answer, machine.journal(SERVICE))
        status = json.loads(str(arm64.request("GET", "/status")["body"]))
        assert status["authenticated"] is True

        arm64.upload_then_load(os.urandom(3_000_017), timeout=SLOW)
    finally:
        machine.write(DEFAULTS, shipped)
        machine.run("rm", "-f", "/root/model.onnx", "/root/copy.onnx")
