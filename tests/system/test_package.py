"""The .deb on a booted Debian 12: install, socket activation, sandbox, watchdog, upgrade, purge.

The tests share one container and run in file order, as the package's life goes:
installed, used, restarted, upgraded, removed, purged.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loader import __version__
from loader.systemd import CRASH_LOOP_RUNS
from tests.conftest import EMAIL, PASSWORD
from tests.dockerd import ArchiveInfo, PrivateDockerd, present_images
from tests.system.conftest import DOCKER_DIR, REPO, UPGRADE_VERSION, Booted

pytestmark = pytest.mark.system

SERVICE = "azaion-loader.service"
SOCKET = "azaion-loader.socket"
SOCKET_PATH = "/run/azaion-loader.sock"
CACHE_FILE = "/var/cache/azaion-loader/models/kept.big"
STATE_FILE = "/var/lib/azaion-loader/kept.state"
DEFAULTS = "/etc/default/azaion-loader"
MAX_EXPOSURE = 1.5


@pytest.fixture
def installed(booted: Booted) -> Booted:
    if not booted.package_state().startswith("installed "):
        booted.install(booted.deb)
    return booted


def active(booted: Booted, unit: str) -> str:
    return booted.machine.run("systemctl", "is-active", unit, check=False).stdout.strip()


def exists(booted: Booted, path: str) -> bool:
    return booted.machine.run("test", "-e", path, check=False).returncode == 0


def restart(booted: Booted) -> None:
    # A test may leave the service failed (a bad setting): its state starts clean.
    booted.machine.run("systemctl", "reset-failed", SERVICE, SOCKET)
    booted.machine.run("systemctl", "restart", SERVICE)


def health(booted: Booted, user: str | None = None) -> dict[str, object]:
    return booted.request("GET", "/health", user=user)


def main_pid(booted: Booted) -> int:
    return int(booted.machine.show(SERVICE, "MainPID")["MainPID"])


def test_lintian_finds_no_error_or_warning(booted: Booted) -> None:
    if shutil.which("lintian") is None:
        # As scripts/build-deb does; the session already runs as root.
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", "lintian"],
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            capture_output=True,
            check=True,
        )
    changes = str(booted.packages.changes)
    result = subprocess.run(
        ["lintian", "-I", "-E", "--pedantic", "--fail-on", "error,warning", changes],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_piuparts_passes(booted: Booted, tmp_path: Path) -> None:
    """What `make piuparts` runs: install, remove and purge in a clean Debian 12."""
    result = subprocess.run(
        [REPO / "scripts" / "build-deb", "--out", tmp_path, "--no-lintian", "--piuparts"],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "PASS: All tests." in output


def test_install_listens_without_starting_the_service(installed: Booted) -> None:
    assert installed.package_state() == f"installed {__version__}"
    assert active(installed, SOCKET) == "active"
    assert active(installed, SERVICE) == "inactive"


def test_first_connection_starts_the_service(installed: Booted) -> None:
    answer = health(installed)
    assert answer["status"] == 200, answer
    assert json.loads(str(answer["body"])) == {"status": "healthy"}
    assert active(installed, SERVICE) == "active", installed.machine.journal(SERVICE)


def test_service_reported_ready_and_its_status(installed: Booted) -> None:
    health(installed)
    shown = installed.machine.show(SERVICE, "ActiveState", "SubState", "StatusText", "Type")
    # A Type=notify service is active only once it sent READY=1.
    assert shown == {
        "Type": "notify",
        "ActiveState": "active",
        "SubState": "running",
        "StatusText": "Serving",
    }
    status = installed.request("GET", "/status")
    assert json.loads(str(status["body"]))["modelCacheDir"] == "/var/cache/azaion-loader/models"


def test_the_daemon_runs_with_the_units_malloc_arenas(installed: Booted) -> None:
    """The unit caps glibc's malloc arenas (see its comment); the daemon must get the cap."""
    unit = (REPO / "systemd" / SERVICE).read_text()
    wanted = re.search(r"^Environment=(MALLOC_ARENA_MAX=\d+)$", unit, re.M)
    assert wanted is not None
    health(installed)
    environ = installed.machine.run("cat", f"/proc/{main_pid(installed)}/environ").stdout
    assert wanted.group(1) in environ.split("\0")


def test_socket_is_for_root_and_the_group_only(installed: Booted) -> None:
    machine = installed.machine
    shown = machine.run("stat", "-c", "%A %U:%G", SOCKET_PATH).stdout.strip()
    assert shown == "srw-rw---- root:azaion-loader"
    for user, groups in (("outsider", []), ("insider", ["-G", "azaion-loader"])):
        if machine.run("id", user, check=False).returncode != 0:
            machine.run("useradd", "--no-create-home", *groups, user)
    refused = health(installed, user="outsider")
    assert refused.get("error") == "PermissionError", refused
    assert health(installed, user="insider")["status"] == 200


def test_state_and_cache_directories_are_the_daemons_alone(installed: Booted) -> None:
    health(installed)
    for path in ("/var/lib/azaion-loader", "/var/cache/azaion-loader/models"):
        shown = installed.machine.run("stat", "-c", "%A %U:%G", path).stdout.strip()
        assert shown == "drwx------ azaion-loader:azaion-loader", path


def test_units_verify(installed: Booted) -> None:
    result = installed.machine.run(
        "systemd-analyze",
        "verify",
        "--man=no",
        f"/usr/lib/systemd/system/{SOCKET}",
        f"/usr/lib/systemd/system/{SERVICE}",
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "azaion-loader" not in result.stderr, result.stderr


def test_security_exposure(installed: Booted) -> None:
    out = installed.machine.run("systemd-analyze", "security", "--no-pager", SERVICE).stdout
    found = re.search(rf"Overall exposure level for {SERVICE}: (\d+\.\d+)", out)
    assert found, out
    exposure = float(found.group(1))
    print(f"systemd-analyze security {SERVICE}: {exposure}")
    assert exposure <= MAX_EXPOSURE, out


# What the unit's sandbox must let the daemon do, and what it must not: run under
# `systemd-run` with the [Service] settings of the installed unit.
SANDBOX_PROBE = """\
import errno, json, os, socket, sys
result = {"uid": os.getuid()}
def attempt(name, action):
    try:
        action()
        result[name] = "ok"
    except OSError as exc:
        result[name] = errno.errorcode.get(exc.errno, str(exc))
def write(path):
    with open(path, "w") as file:
        file.write("x")
def connect(family, address):
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(address)
attempt("read images", lambda: open("/opt/azaion/images.enc", "rb").read())
for path in sys.argv[2:]:
    attempt("write " + path, lambda: write(path))
attempt("docker socket", lambda: connect(socket.AF_UNIX, "/run/azl-engine.sock"))
host, port = sys.argv[1].rsplit(":", 1)
attempt("tcp", lambda: connect(socket.AF_INET, (host, int(port))))
attempt("netlink", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW).close())
caps = [l for l in open("/proc/self/status") if l.startswith("CapEff")]
result["capabilities"] = caps[0].split()[1]
print(json.dumps(result))
"""

FAKE_ENGINE = """\
import grp, os, socket, time
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.bind("/run/azl-engine.sock")
os.chown("/run/azl-engine.sock", 0, grp.getgrnam("docker").gr_gid)
os.chmod("/run/azl-engine.sock", 0o660)
sock.listen(16)
time.sleep(600)
"""

_NOT_SANDBOX = re.compile(
    r"(Type|NotifyAccess|ExecStart|Restart|RestartSec|RestartPreventExitStatus|WatchdogSec|"
    r"TimeoutStopSec)="
)


def sandbox_properties(booted: Booted) -> list[str]:
    """The installed unit's [Service] settings that shape the process, as `-p` options."""
    text = booted.machine.run("systemctl", "cat", SERVICE).stdout
    options: list[str] = []
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif (
            section == "[Service]"
            and line
            and not line.startswith("#")
            and not _NOT_SANDBOX.match(line)
        ):
            options += ["-p", line]
    return options


@pytest.fixture
def fake_engine(installed: Booted) -> Iterator[str]:
    """A socket like dockerd's (root:docker 0660) that accepts and says nothing."""
    machine = installed.machine
    machine.run("systemd-run", "--unit=azl-engine", "--quiet", "python3", "-c", FAKE_ENGINE)
    try:
        machine.wait_for("the fake engine", lambda: exists(installed, "/run/azl-engine.sock"))
        yield "/run/azl-engine.sock"
    finally:
        machine.run("systemctl", "stop", "azl-engine.service", check=False)
        machine.run("rm", "-f", "/run/azl-engine.sock")


def test_sandbox_allows_only_what_the_daemon_needs(
    installed: Booted, fake_engine: str, emulator_url: str
) -> None:
    machine = installed.machine
    machine.run("install", "-d", "/opt/azaion")
    machine.run(
        "install", "-m", "0640", "-g", "azaion-loader", "/dev/null", "/opt/azaion/images.enc"
    )
    writable = ["/var/lib/azaion-loader/probe", "/var/cache/azaion-loader/models/probe", "/tmp/p"]
    read_only = ["/etc/probe", "/usr/probe", "/opt/azaion/probe", "/var/probe"]
    # /run stays writable for root under ProtectSystem=strict; the user may not write there.
    denied = ["/root/probe", "/home/probe", "/run/probe"]
    run = machine.run(
        "systemd-run",
        "--wait",
        "--pipe",
        "--quiet",
        *sandbox_properties(installed),
        "python3",
        "-c",
        SANDBOX_PROBE,
        emulator_url.removeprefix("http://"),
        *writable,
        *read_only,
        *denied,
    )
    result = json.loads(run.stdout)
    uid = int(machine.run("id", "-u", "azaion-loader").stdout)
    expected: dict[str, object] = {
        "uid": uid,
        "capabilities": "0000000000000000",
        "read images": "ok",
        "docker socket": "ok",
        "tcp": "ok",
        "netlink": "EAFNOSUPPORT",
    }
    expected |= {f"write {path}": "ok" for path in writable}
    expected |= {f"write {path}": "EROFS" for path in read_only}
    expected |= {f"write {path}": "EACCES" for path in denied}
    assert result == expected
    machine.run("rm", "-f", *writable[:2])


def test_daemon_logs_in_over_the_network(installed: Booted, emulator_url: str) -> None:
    """Settings from /etc/default reach the daemon, which resolves a name and speaks HTTP."""
    machine = installed.machine
    shipped = machine.run("cat", DEFAULTS).stdout
    url = emulator_url.replace("127.0.0.1", "localhost")
    machine.write(DEFAULTS, shipped + f"RESOURCE_API_URL={url}\nCDN_URL={url}/cdn\n")
    try:
        restart(installed)
        wrong = installed.request("POST", "/login", {"email": EMAIL, "password": "wrong"})
        assert wrong["status"] == 401, wrong
        answer = installed.request("POST", "/login", {"email": EMAIL, "password": PASSWORD})
        assert answer["status"] == 200, (answer, machine.journal(SERVICE))
        status = json.loads(str(installed.request("GET", "/status")["body"]))
        assert status["authenticated"] is True
        assert PASSWORD not in machine.journal(SERVICE, lines=200)
    finally:
        machine.write(DEFAULTS, shipped)
        restart(installed)


def with_archive_and_engine(
    installed: Booted,
    emulator_url: str,
    private_dockerd: PrivateDockerd,
    archive: ArchiveInfo,
    owner: str,
    mode: str,
) -> str:
    """The archive at /opt/azaion/images.enc with this owner and mode, the daemon set to the
    emulator and the host's test dockerd, bound in; returns the shipped defaults."""
    machine = installed.machine
    shipped = machine.run("cat", DEFAULTS).stdout
    inside = machine.root / "opt/azaion/images.enc"
    inside.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(archive.path, inside)
    machine.run("chown", owner, "/opt/azaion/images.enc")
    machine.run("chmod", mode, "/opt/azaion/images.enc")
    # The daemon reaches Docker as a member of the container's docker group.
    docker_gid = int(machine.run("getent", "group", "docker").stdout.split(":")[2])
    os.chmod(private_dockerd.socket.parent, 0o755)  # noqa: S103 - a throwaway test daemon
    os.chown(private_dockerd.socket, 0, docker_gid)
    machine.write(
        DEFAULTS,
        shipped
        + f"RESOURCE_API_URL={emulator_url}\nCDN_URL={emulator_url}/cdn\n"
        + f"DOCKER_HOST=unix://{DOCKER_DIR}/{private_dockerd.socket.name}\n",
    )
    return shipped


def test_full_unlock_inside_with_progress_in_systemctl(
    installed: Booted,
    emulator_url: str,
    private_dockerd: PrivateDockerd,
    big_archive: ArchiveInfo,
    no_stack_images: list[str],
) -> None:
    """The installed daemon unlocks the archive into the host's test dockerd, bound in."""
    machine = installed.machine
    shipped = with_archive_and_engine(
        installed, emulator_url, private_dockerd, big_archive, "root:azaion-loader", "0640"
    )
    try:
        restart(installed)
        answer = installed.request("POST", "/unlock", {"email": EMAIL, "password": PASSWORD})
        assert answer["status"] == 200, answer
        seen: set[str] = set()

        def settled() -> bool:
            seen.add(machine.show(SERVICE, "StatusText")["StatusText"])
            state = json.loads(str(installed.request("GET", "/unlock/status")["body"]))
            return state["state"] in ("ready", "error")

        machine.wait_for("the unlock to settle", settled, timeout=180)
        final = json.loads(str(installed.request("GET", "/unlock/status")["body"]))
        assert final["state"] == "ready", (final, machine.journal(SERVICE))
        assert any(
            line.startswith("Unlocking: loading image ") and " of 7, " in line for line in seen
        ), seen
        status = machine.run("systemctl", "status", "--no-pager", SERVICE, check=False).stdout
        assert 'Status: "Ready: 7 images at latest"' in status, status
        assert sorted(present_images(private_dockerd, no_stack_images)) == sorted(no_stack_images)
    finally:
        machine.write(DEFAULTS, shipped)
        machine.run("rm", "-f", "/opt/azaion/images.enc")
        restart(installed)


def test_upload_and_load_with_the_cli_on_debians_libraries(
    installed: Booted, emulator_url: str
) -> None:
    """The client commands and /upload, /load on Debian's aiohttp, cryptography and Python."""
    machine = installed.machine
    shipped = machine.run("cat", DEFAULTS).stdout
    machine.write(
        DEFAULTS, shipped + f"RESOURCE_API_URL={emulator_url}\nCDN_URL={emulator_url}/cdn\n"
    )
    try:
        restart(installed)
        installed.upload_then_load(os.urandom(3_000_017))
        assert exists(installed, "/var/cache/azaion-loader/models/models/model.onnx.big")
        # /metrics, through Debian 12's python3-prometheus-client.
        metrics = installed.metrics()
        assert metrics["azaion_loader_resource_loads_total{source=cdn}"] == 1, metrics
        assert metrics["azaion_loader_resource_loads_total{source=cache}"] == 1, metrics
        assert metrics["azaion_loader_resource_uploads_total{}"] == 1, metrics
    finally:
        machine.write(DEFAULTS, shipped)
        machine.run("rm", "-f", "/root/model.onnx", "/root/copy.onnx")
        restart(installed)


def test_doctor_finds_what_the_service_user_and_a_caller_lack(
    installed: Booted,
    emulator_url: str,
    private_dockerd: PrivateDockerd,
    image_archive: ArchiveInfo,
) -> None:
    """`azaion-loader doctor` on the installed package: the daemon, as user azaion-loader,
    cannot read an archive of root's alone, and says how to fix it; a user outside the
    socket's group is told to join it."""
    machine = installed.machine
    shipped = with_archive_and_engine(
        installed, emulator_url, private_dockerd, image_archive, "root:root", "0600"
    )
    for user, groups in (("outsider", []), ("insider", ["-G", "azaion-loader"])):
        if machine.run("id", user, check=False).returncode != 0:
            machine.run("useradd", "--no-create-home", *groups, user)
    try:
        restart(installed)
        found = machine.run("azaion-loader", "doctor", check=False)
        print(found.stdout)
        assert found.returncode == 1, found.stdout + found.stderr
        lines = {line.split()[1]: line for line in found.stdout.splitlines()}
        assert list(lines) == [
            *("socket", "access", "socket-unit", "engine", "images", "space", "archive"),
            *("resource-api", "cdn", "clock"),
        ]
        assert lines["socket-unit"] == "ok      socket-unit   azaion-loader.socket is active"
        assert lines["archive"] == (
            "failed  archive       cannot read /opt/azaion/images.enc as user azaion-loader: "
            "Permission denied -> sudo chgrp azaion-loader /opt/azaion/images.enc && "
            "sudo chmod g+r /opt/azaion/images.enc (and x on its folders)"
        )
        failed = [line for line in lines.values() if line.startswith("failed")]
        assert failed == [lines["archive"]], found.stdout
        # What the hint says, done: the archive is the service's to read, all pass.
        machine.run("chgrp", "azaion-loader", "/opt/azaion/images.enc")
        machine.run("chmod", "g+r", "/opt/azaion/images.enc")
        fixed = machine.run("runuser", "-u", "insider", "--", "azaion-loader", "doctor")
        assert "ok      archive       /opt/azaion/images.enc, " in fixed.stdout
        assert "readable by user azaion-loader" in fixed.stdout
        print(fixed.stdout)
        outside = machine.run(
            "runuser", "-u", "outsider", "--", "azaion-loader", "doctor", check=False
        )
        assert outside.returncode == 1
        assert (
            "failed  access        permission denied on /run/azaion-loader.sock: outsider is "
            "not in group azaion-loader -> sudo usermod -aG azaion-loader outsider, then log "
            "in again"
        ) in outside.stdout.splitlines()
    finally:
        machine.write(DEFAULTS, shipped)
        machine.run("rm", "-f", "/opt/azaion/images.enc")
        restart(installed)


def test_ten_clean_starts_in_a_minute_are_all_served(installed: Booted) -> None:
    """The socket starts the daemon on every request after a stop: no start limit counts
    these starts, and the socket never fails for them (no reset-failed here)."""
    machine = installed.machine
    pids = set()
    started = time.monotonic()
    for _ in range(10):
        machine.run("systemctl", "stop", SERVICE)
        answer = health(installed)
        assert answer["status"] == 200, (answer, machine.show(SOCKET, "ActiveState", "Result"))
        pids.add(main_pid(installed))
    took = time.monotonic() - started
    print(f"10 stop-then-request cycles: {took:.1f} s")
    assert took < 60
    assert len(pids) == 10
    assert machine.show(SOCKET, "ActiveState", "Result") == {
        "ActiveState": "active",
        "Result": "success",
    }


def _config_errors(booted: Booted) -> int:
    return booted.machine.journal(SERVICE, lines=500).count("configuration error: LOG_LEVEL")


def test_bad_setting_is_told_to_callers_and_served_once_fixed(installed: Booted) -> None:
    """Exit 78 is not restarted; each request starts the daemon once and gets its 503, and
    nothing starts it between requests. Once fixed, the next request is served."""
    machine = installed.machine
    shipped = machine.run("cat", DEFAULTS).stdout
    machine.write(DEFAULTS, shipped + "LOG_LEVEL=loud\n")
    try:
        machine.run("systemctl", "stop", SERVICE)
        before = _config_errors(installed)
        for _ in range(8):  # more than the start limit that used to fail the socket (5)
            answer = health(installed)
            assert answer.get("status") == 503, answer
            body = json.loads(str(answer["body"]))
            assert body["code"] == "config-error", body
            assert body["detail"].startswith("configuration error: LOG_LEVEL"), body
        machine.wait_for("the daemon to exit", lambda: active(installed, SERVICE) == "failed")
        shown = machine.show(SERVICE, "ExecMainStatus", "NRestarts")
        assert shown == {"ExecMainStatus": "78", "NRestarts": "0"}
        time.sleep(3)  # nobody asks: nothing starts it
        assert _config_errors(installed) - before == 8, machine.journal(SERVICE)
        assert active(installed, SOCKET) == "active"
        assert exists(installed, SOCKET_PATH)
    finally:
        machine.write(DEFAULTS, shipped)
    assert health(installed)["status"] == 200
    assert active(installed, SERVICE) == "active"


def test_crash_loop_is_paced_and_ends_with_its_cause(installed: Booted) -> None:
    """A process that exits non-zero at every start is restarted every RestartSec=, the socket
    stays up, and once the cause is gone the request waiting meanwhile is served. (It is not
    the daemon, so nothing stops this loop: the next test has the daemon stop one.)"""
    machine = installed.machine
    dropin = f"/run/systemd/system/{SERVICE}.d/test-crash.conf"
    machine.write(dropin, "[Service]\nExecStart=\nExecStart=/bin/sh -c 'exit 3'\n")
    try:
        machine.run("systemctl", "daemon-reload")
        machine.run("systemctl", "stop", SERVICE)
        restarts = int(machine.show(SERVICE, "NRestarts")["NRestarts"])
        machine.run("systemctl", "start", "--no-block", SERVICE)
        time.sleep(12)
        shown = machine.show(SERVICE, "NRestarts", "ExecMainStatus", "SubState")
        paced = int(shown["NRestarts"]) - restarts
        print(f"crash loop: {paced} restarts in 12 s")
        # RestartSec=5: restarts at about 5 s and 10 s (2 s would have made 5 or 6).
        assert 1 <= paced <= 3, shown
        assert shown["ExecMainStatus"] == "3", shown
        assert active(installed, SOCKET) == "active"
    finally:
        machine.run("rm", "-f", dropin)
        machine.run("systemctl", "daemon-reload")
    started = time.monotonic()
    answer = health(installed)  # waits for the next restart, which runs the daemon again
    print(f"served {time.monotonic() - started:.1f} s after the cause was gone")
    assert answer["status"] == 200, (answer, machine.journal(SERVICE))
    assert machine.show(SOCKET, "ActiveState", "Result") == {
        "ActiveState": "active",
        "Result": "success",
    }


def test_a_crash_loop_stops_and_the_next_request_runs_the_daemon(installed: Booted) -> None:
    """The daemon killed soon after each start: restarted 5 s later each time, until the start
    after CRASH_LOOP_RUNS crashes in a row exits 75 and leaves the service failed. Nothing
    starts it then; the socket listens, and the next request is served, no reset-failed."""
    machine = installed.machine
    restart(installed)
    restarts = int(machine.show(SERVICE, "NRestarts")["NRestarts"])
    for crash in range(1, CRASH_LOOP_RUNS + 1):
        killed = main_pid(installed)
        machine.run("systemctl", "kill", "--kill-whom=main", "--signal=SIGKILL", SERVICE)
        if crash == CRASH_LOOP_RUNS:
            break

        def restarted(crash: int = crash, killed: int = killed) -> bool:
            shown = machine.show(SERVICE, "NRestarts", "MainPID", "SubState")
            return (
                int(shown["NRestarts"]) == restarts + crash
                and int(shown["MainPID"]) not in (0, killed)
                and shown["SubState"] == "running"
            )

        machine.wait_for(f"restart {crash} after a crash", restarted, timeout=20)

    machine.wait_for(
        "the crash loop to stop", lambda: active(installed, SERVICE) == "failed", timeout=20
    )
    shown = machine.show(SERVICE, "NRestarts", "ExecMainStatus")
    assert shown == {
        "NRestarts": str(restarts + CRASH_LOOP_RUNS),
        "ExecMainStatus": "75",
    }, shown
    journal = machine.journal(SERVICE, lines=200)
    assert f"crashed {CRASH_LOOP_RUNS} times in a row" in journal, journal
    assert machine.show(SOCKET, "ActiveState", "Result") == {
        "ActiveState": "active",
        "Result": "success",
    }
    assert health(installed)["status"] == 200
    assert active(installed, SERVICE) == "active"
    told = machine.journal(SERVICE, lines=500).count("crash(es) in a row")
    assert f"starting after {CRASH_LOOP_RUNS} crash(es) in a row" in machine.journal(SERVICE)
    restart(installed)  # a clean stop clears the count: this start follows no crash
    assert machine.journal(SERVICE, lines=500).count("crash(es) in a row") == told
    assert not exists(installed, "/run/azaion-loader/runs.part")


def test_watchdog_restarts_a_frozen_daemon(installed: Booted) -> None:
    machine = installed.machine
    dropin = f"/run/systemd/system/{SERVICE}.d/test-watchdog.conf"
    machine.write(dropin, "[Service]\nWatchdogSec=2\n")
    try:
        machine.run("systemctl", "daemon-reload")
        restart(installed)
        assert machine.show(SERVICE, "WatchdogUSec")["WatchdogUSec"] == "2s"
        frozen = main_pid(installed)
        restarts = int(machine.show(SERVICE, "NRestarts")["NRestarts"])
        machine.run("systemctl", "kill", "--kill-whom=main", "--signal=SIGSTOP", SERVICE)

        def restarted() -> bool:
            shown = machine.show(SERVICE, "NRestarts", "MainPID", "ActiveState")
            return (
                int(shown["NRestarts"]) == restarts + 1
                and shown["MainPID"] not in ("0", str(frozen))
                and shown["ActiveState"] == "active"
            )

        machine.wait_for("the watchdog to restart the daemon", restarted, timeout=20)
        assert "Failed with result 'watchdog'" in machine.journal(SERVICE, lines=100)
        assert health(installed)["status"] == 200
    finally:
        machine.run("rm", "-f", dropin)
        machine.run("systemctl", "daemon-reload")
        restart(installed)


def put_kept_files(booted: Booted) -> None:
    health(booted)  # systemd makes the state and cache directories when the service starts
    for path, text in ((CACHE_FILE, "model"), (STATE_FILE, "state")):
        booted.machine.write(path, text, mode="0600")
        booted.machine.run("chown", "azaion-loader:azaion-loader", path)


def kept_files(booted: Booted) -> list[str]:
    return [booted.machine.run("cat", path).stdout for path in (CACHE_FILE, STATE_FILE)]


def test_restart_keeps_the_model_cache(installed: Booted) -> None:
    put_kept_files(installed)
    before = main_pid(installed)
    restart(installed)
    assert main_pid(installed) not in (0, before)
    assert kept_files(installed) == ["model", "state"]


def test_upgrade_stops_the_old_code_and_keeps_the_cache(installed: Booted) -> None:
    put_kept_files(installed)
    old = main_pid(installed)
    assert old != 0
    installed.install(installed.upgrade_deb)
    assert installed.package_state() == f"installed {UPGRADE_VERSION}"
    # Stopped before dpkg unpacked the new files; the next request starts the new code.
    assert active(installed, SERVICE) == "inactive", installed.machine.journal(SERVICE)
    assert active(installed, SOCKET) == "active"
    assert kept_files(installed) == ["model", "state"]
    assert health(installed)["status"] == 200
    assert main_pid(installed) not in (0, old)


def test_remove_stops_both_and_keeps_state(installed: Booted) -> None:
    health(installed)
    installed.machine.run("apt-get", "remove", "-y", "-q", "azaion-loader")
    assert installed.package_state().startswith("config-files ")
    assert active(installed, SERVICE) == "inactive"
    assert active(installed, SOCKET) == "inactive"
    assert not exists(installed, SOCKET_PATH)
    for path in (CACHE_FILE, STATE_FILE, DEFAULTS):
        assert exists(installed, path), path


def test_purge_removes_state_and_settings(booted: Booted) -> None:
    if booted.package_state() == "":
        booted.install(booted.deb)
        put_kept_files(booted)
    booted.machine.run("apt-get", "purge", "-y", "-q", "azaion-loader")
    assert booted.package_state() == ""
    for path in (
        "/var/lib/azaion-loader",
        "/var/cache/azaion-loader",
        DEFAULTS,
        SOCKET_PATH,
        f"/etc/systemd/system/sockets.target.wants/{SOCKET}",
    ):
        assert not exists(booted, path), path
