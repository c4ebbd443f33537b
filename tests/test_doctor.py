"""`azaion-loader doctor` and GET /doctor: each fault produced for real, then told with a hint."""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from loader.doctor import FAILED, OK, WARNING, clock_check
from loader.settings import Settings
from tests.conftest import LocalApp, Spawn, daemon_env, loader_command, socket_answers, wait_for
from tests.dockerd import ArchiveInfo, PrivateDockerd
from tests.emulator import Emulator, EmulatorConfig
from tests.emulator import make_app as make_emulator_app
from tests.test_cli import cli
from tests.test_tls import certificate, https_emulator  # noqa: F401
from tests.test_unlock import tiny_dockerd  # noqa: F401

DAEMON_CHECKS = ["engine", "images", "space", "archive", "resource-api", "cdn", "clock"]


async def doctor(app: LocalApp) -> dict[str, dict[str, str]]:
    """GET /doctor over the socket: each check by its name, in the daemon's order."""
    async with app.session.get(app.url("/doctor")) as resp:
        assert resp.status == 200
        checks = (await resp.json())["checks"]
    assert [check["name"] for check in checks] == DAEMON_CHECKS
    return {check["name"]: check for check in checks}


@pytest.fixture
def daemon(spawn: Spawn, settings: Settings) -> Callable[..., Any]:
    """The daemon as a process, with any variable changed; returns its socket."""

    async def start(*wrapper: str, **env: str) -> Path:
        await spawn(*wrapper, *loader_command(), "serve", env=daemon_env(settings, **env))
        await wait_for(lambda: socket_answers(settings.socket_path), what="the daemon")
        return settings.socket_path

    return start


@pytest.mark.docker
async def test_a_healthy_device_passes_every_check(
    daemon: Callable[..., Any],
    private_dockerd: PrivateDockerd,
    docker_api: Any,
    image_archive: ArchiveInfo,
) -> None:
    sock = await daemon(DOCKER_HOST=private_dockerd.host, IMAGES_PATH=str(image_archive.path))
    result = await cli("doctor", socket=sock)
    assert result.code == 0, result.out + result.err
    lines = result.out.splitlines()
    assert [line.split()[1] for line in lines] == ["socket", "access", *DAEMON_CHECKS]
    assert all(line.startswith("ok      ") for line in lines), result.out
    assert f"Docker {docker_api.version()['Version']} (API " in lines[2]
    assert "readable by user root" in result.out
    as_json = await cli("doctor", "--json", socket=sock)
    assert as_json.code == 0
    checks = json.loads(as_json.out)["checks"]
    assert {check["status"] for check in checks} == {OK}
    assert set(checks[0]) == {"name", "status", "detail", "hint"}


@pytest.fixture
async def tiny_app(
    make_local_app: Callable[[Settings], Any],
    with_settings: Callable[..., Settings],
    tiny_dockerd: PrivateDockerd,  # noqa: F811
    image_archive: ArchiveInfo,
) -> LocalApp:
    """The app against a dockerd whose data root is a 64 MB tmpfs, and the test archive
    (a PrivateDockerd: --bridge=none, no iptables, no forwarding)."""
    app: LocalApp = await make_local_app(
        with_settings(docker_host=tiny_dockerd.host, images_path=image_archive.path)
    )
    return app


@pytest.mark.docker
async def test_a_stopped_engine_fails_and_leaves_its_checks_unchecked(
    tiny_app: LocalApp,
    tiny_dockerd: PrivateDockerd,  # noqa: F811
) -> None:
    assert (await doctor(tiny_app))["engine"]["status"] == OK
    tiny_dockerd.kill()
    checks = await doctor(tiny_app)
    assert checks["engine"]["status"] == FAILED
    assert (
        f"cannot reach the container engine at {tiny_dockerd.socket}" in checks["engine"]["detail"]
    )
    assert "systemctl start docker" in checks["engine"]["hint"]
    assert checks["images"]["status"] == checks["space"]["status"] == WARNING
    assert checks["archive"]["status"] == OK  # the rest still ran


@pytest.mark.docker
async def test_a_spool_too_small_for_the_archive_fails(
    tiny_app: LocalApp,
    tiny_dockerd: PrivateDockerd,  # noqa: F811
) -> None:
    space = (await doctor(tiny_app))["space"]
    assert space["status"] == FAILED
    assert (
        f"Docker needs about 0.3 GB free on the filesystem of {tiny_dockerd.data_root}"
        in space["detail"]
    )
    assert "but only 0.1 GB is free" in space["detail"]
    assert "move Docker's data root" in space["hint"]


@pytest.mark.parametrize(
    ("skew", "status"), [(10 * 60, WARNING), (-2 * 86400, FAILED)], ids=["minutes", "days"]
)
async def test_a_clock_off_from_the_remotes_is_told(
    aiohttp_server: Callable[..., Any],
    make_local_app: Callable[[Settings], Any],
    with_settings: Callable[..., Settings],
    tmp_path: Path,
    skew: int,
    status: str,
) -> None:
    """A Resource API whose Date header is off by `skew` s: as the device sees it, its own
    clock is off the other way."""
    config = EmulatorConfig(storage_dir=tmp_path / "skewed", clock_offset=skew)
    server = await aiohttp_server(make_emulator_app(Emulator(config)))
    url = f"http://127.0.0.1:{server.port}"
    app = await make_local_app(with_settings(resource_api_url=url, cdn_url=url + "/cdn"))
    clock = (await doctor(app))["clock"]
    assert clock["status"] == status, clock
    ahead = "ahead of" if skew < 0 else "behind"
    assert ahead in clock["detail"], clock
    if status == FAILED:
        assert clock["hint"], clock


async def test_an_unreachable_api_and_cdn_fail(
    make_local_app: Callable[[Settings], Any],
    with_settings: Callable[..., Settings],
    unused_tcp_port: int,
) -> None:
    down = f"http://127.0.0.1:{unused_tcp_port}"
    app = await make_local_app(with_settings(resource_api_url=down, cdn_url=down + "/cdn"))
    checks = await doctor(app)
    assert checks["resource-api"]["status"] == FAILED
    assert f"could not reach the Resource API at {down}/" in checks["resource-api"]["detail"]
    assert "RESOURCE_API_URL" in checks["resource-api"]["hint"]
    assert checks["cdn"]["status"] == FAILED
    assert "CDN_URL" in checks["cdn"]["hint"]
    assert checks["clock"]["status"] == WARNING  # no remote told its time


async def test_an_untrusted_certificate_fails_until_its_ca_is_given(
    make_local_app: Callable[[Settings], Any],
    with_settings: Callable[..., Settings],
    https_emulator: str,  # noqa: F811
    certificate: tuple[Path, Path],  # noqa: F811
) -> None:
    remote = {"resource_api_url": https_emulator, "cdn_url": https_emulator + "/cdn"}
    untrusting = await make_local_app(with_settings(**remote))
    checks = await doctor(untrusting)
    for name in ("resource-api", "cdn"):
        assert checks[name]["status"] == FAILED
        assert "TLS certificate is not trusted" in checks[name]["detail"]
        assert "TLS_CA_FILE" in checks[name]["hint"]
    trusting = await make_local_app(with_settings(**remote, tls_ca_file=certificate[0]))
    checks = await doctor(trusting)
    assert checks["resource-api"]["status"] == OK
    assert checks["resource-api"]["detail"] == f"{https_emulator} answers, certificate trusted"
    assert checks["clock"]["status"] == OK


async def test_an_archive_the_daemons_user_cannot_read_fails(
    daemon: Callable[..., Any], settings: Settings, short_dir: Path
) -> None:
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run the daemon as another user")
    archive = short_dir / "images.enc"
    archive.write_bytes(b"\0" * 4096)
    archive.chmod(0o600)  # root's alone
    os.chmod(short_dir, 0o777)  # noqa: S103 - the daemon, as nobody, binds its socket here
    models = short_dir / "models"
    models.mkdir()
    os.chown(models, 65534, 65534)
    sock = await daemon(
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        IMAGES_PATH=str(archive),
        MODEL_CACHE_DIR=str(models),
    )
    result = await cli("doctor", socket=sock)
    assert result.code == 1
    line = next(line for line in result.out.splitlines() if line.split()[1] == "archive")
    assert line.startswith(f"failed  archive       cannot read {archive} as user nobody: ")
    assert "Permission denied -> sudo chgrp nogroup" in line


async def test_a_caller_outside_the_sockets_group_is_told_to_join_it(
    daemon: Callable[..., Any],
) -> None:
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run the client as another user")
    sock = await daemon()
    os.chmod(sock.parent, 0o755)  # noqa: S103 - the socket itself stays 0660 root:root
    proc = await asyncio.create_subprocess_exec(
        *("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"),
        *(*loader_command(), "doctor", "--socket", str(sock)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    lines = out.decode().splitlines()
    assert lines[0].startswith(f"ok      socket        {sock} (srw-rw---- root:root)")
    assert lines[1] == (
        f"failed  access        permission denied on {sock}: nobody is not in group root "
        "-> sudo usermod -aG root nobody, then log in again"
    )
    assert lines[2].startswith("failed  daemon        its checks did not run: permission denied")


async def test_no_daemon_fails_with_the_local_checks_still_printed(short_dir: Path) -> None:
    result = await cli("doctor", socket=short_dir / "none.sock")
    assert result.code == 1
    assert result.out.splitlines()[0] == (
        f"failed  socket        no socket at {short_dir}/none.sock -> "
        "sudo systemctl enable --now azaion-loader.socket (or run `azaion-loader serve`)"
    )
    assert result.out.splitlines()[1].startswith("failed  daemon        its checks did not run")


@pytest.mark.parametrize(
    ("skew", "status", "detail"),
    [
        (-4, OK, "4 s behind the remote's clock"),
        (600, WARNING, "600 s ahead of the remote's clock"),
        (-2 * 86400, FAILED, "48.0 h behind the remote's clock"),
    ],
)
def test_the_clock_against_the_remotes_date(skew: int, status: str, detail: str) -> None:
    remote = 1_780_000_000
    check = clock_check(remote + skew, email.utils.formatdate(remote, usegmt=True))
    assert (check.status, check.detail) == (status, detail)
    assert (check.hint == "") == (status == OK)


async def test_help_tells_the_checks_and_the_exit_status() -> None:
    result = await cli("doctor", "--help")
    assert result.code == 0
    assert "example:\n  azaion-loader doctor" in result.out
    assert "0 no check failed (warnings allowed), 1 a check failed or the" in result.out
