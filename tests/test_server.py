"""The daemon as a process: its own socket, systemd socket activation, sd_notify, signals."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import signal
import socket
import stat

import pytest

from loader.settings import Settings
from tests.conftest import (
    EMAIL,
    PASSWORD,
    NotifyListener,
    RunningEmulator,
    Spawn,
    daemon_env,
    get_health,
    loader_command,
    session_for,
    skip_or_fail,
    socket_answers,
    stop,
    upload_form,
    wait_for,
)
from tests.emulator import FaultRule


async def test_own_socket_mode_0660_and_removed_on_exit(spawn: Spawn, settings: Settings) -> None:
    proc = await spawn(*loader_command(), "serve", env=daemon_env(settings))
    await wait_for(lambda: socket_answers(settings.socket_path), what="the socket")
    assert await get_health(settings.socket_path) == {"status": "healthy"}
    mode = os.stat(settings.socket_path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o660
    code, err = await stop(proc)
    assert code == 0, err
    assert not settings.socket_path.exists()
    assert "<6>loader.server: serving on" in err


async def test_stale_socket_file_is_replaced(spawn: Spawn, settings: Settings) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(settings.socket_path))
    stale.close()  # the file stays; nobody listens on it
    proc = await spawn(*loader_command(), "serve", env=daemon_env(settings))
    await wait_for(lambda: socket_answers(settings.socket_path), what="the socket")
    assert await get_health(settings.socket_path) == {"status": "healthy"}
    code, err = await stop(proc)
    assert code == 0, err
    assert "removing the stale socket" in err


async def test_refuses_to_take_over_a_live_daemon(spawn: Spawn, settings: Settings) -> None:
    first = await spawn(*loader_command(), "serve", env=daemon_env(settings))
    await wait_for(lambda: socket_answers(settings.socket_path), what="the first daemon")
    second = await spawn(*loader_command(), "serve", env=daemon_env(settings))
    _, err = await asyncio.wait_for(second.communicate(), 30)
    assert second.returncode == 1
    assert "already serving on" in err.decode()
    # The first one still owns the path and answers.
    assert await get_health(settings.socket_path) == {"status": "healthy"}
    code, _ = await stop(first)
    assert code == 0


async def test_refuses_a_path_that_is_not_a_socket(spawn: Spawn, settings: Settings) -> None:
    settings.socket_path.write_text("precious")
    proc = await spawn(*loader_command(), "serve", env=daemon_env(settings))
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert "is not a socket" in err.decode()
    assert settings.socket_path.read_text() == "precious"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("API_TIMEOUT", "soon"),
        ("RESOURCE_API_URL", "api.azaion.com"),
        ("REQUIRE_INTEGRITY", "maybe"),
        # Readable, but not a certificate: refused at start, not by a traceback in the app.
        ("TLS_CA_FILE", __file__),
    ],
)
async def test_bad_config_is_one_line_naming_the_variable(
    spawn: Spawn, settings: Settings, name: str, value: str
) -> None:
    proc = await spawn(*loader_command(), "serve", env=daemon_env(settings, **{name: value}))
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 78
    lines = err.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("<3>")
    assert f"{name}: " in lines[0]
    assert not settings.socket_path.exists()


async def test_sd_notify_on_a_real_datagram_socket(
    spawn: Spawn, settings: Settings, notify: NotifyListener
) -> None:
    env = daemon_env(settings, NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="200000")
    proc = await spawn(*loader_command(), "serve", env=env)
    ready = await notify.wait_for("READY=1")
    assert "STATUS=Serving" in ready.split("\n")
    # The socket answers once READY=1 has been sent.
    assert socket_answers(settings.socket_path)
    # Pings at half of WATCHDOG_USEC.
    await notify.wait_for("WATCHDOG=1")
    await notify.wait_for("WATCHDOG=1")
    proc.send_signal(signal.SIGTERM)
    await notify.wait_for("STOPPING=1")
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err


@pytest.fixture
def socket_activate() -> str:
    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        skip_or_fail("systemd-socket-activate is missing (Debian's systemd package)")
    assert tool is not None
    return tool


async def test_socket_activation_serves_the_inherited_socket(
    spawn: Spawn, settings: Settings, notify: NotifyListener, socket_activate: str
) -> None:
    env = daemon_env(settings, NOTIFY_SOCKET=str(notify.path))
    # systemd-socket-activate passes only a minimal environment: forward ours with -E.
    forwarded = [
        f"-E{name}={env[name]}" for name in sorted(env) if name.isupper() and name != "PATH"
    ]
    sock = settings.socket_path.with_name("activated.sock")
    proc = await spawn(
        socket_activate, "-l", str(sock), *forwarded, *loader_command(), "serve", env=env
    )
    # It says so once it listens; the daemon is not started yet.
    assert proc.stderr is not None
    line = await asyncio.wait_for(proc.stderr.readline(), 10)
    assert b"Listening on" in line, line
    # The daemon is started by this first connection, which waits in the backlog meanwhile.
    assert await get_health(sock) == {"status": "healthy"}
    ready = await notify.wait_for("READY=1")
    assert "STATUS=Serving" in ready.split("\n")
    # It served the socket it was given, and did not bind LOADER_SOCKET.
    assert not settings.socket_path.exists()
    code, err = await stop(proc)
    assert code == 0, err
    assert "(from systemd)" in err
    # The socket's owner keeps its file: the daemon never unlinks an inherited socket.
    assert sock.exists()


async def test_sigterm_lets_a_request_in_flight_finish(
    spawn: Spawn, settings: Settings, emulator: RunningEmulator
) -> None:
    emulator.emulator.add_rule(
        FaultRule(method="POST", path_prefix="/login", kind="delay", delay=1.0, count=1)
    )
    proc = await spawn(*loader_command(), "serve", env=daemon_env(settings))
    await wait_for(lambda: socket_answers(settings.socket_path), what="the socket")
    async with session_for(settings.socket_path) as session:
        login = asyncio.create_task(
            session.post("http://loader/login", json={"email": EMAIL, "password": PASSWORD})
        )
        await wait_for(
            lambda: emulator.emulator.stats()["requests"].get("POST /login"),
            what="the login to reach the emulator",
        )
        proc.send_signal(signal.SIGTERM)
        resp = await login
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}
        resp.release()
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err
    assert "stopping" in err.decode()


def forwarded_env(env: dict[str, str]) -> list[str]:
    """systemd-socket-activate passes only a minimal environment: ours goes with -E."""
    return [f"-E{name}={env[name]}" for name in sorted(env) if name.isupper() and name != "PATH"]


async def test_debris_is_gone_before_the_first_request_is_served(
    spawn: Spawn, settings: Settings, socket_activate: str
) -> None:
    """A crash's partial cache files are removed before the socket is served: a request at
    the first instant of a socket-activated start, whose own spool lies beside them, works."""
    cache = settings.model_cache_dir
    cache.mkdir(parents=True)
    debris = [cache / f".incoming-{i:016x}.part" for i in range(3000)]
    for path in debris:
        path.write_bytes(b"left by a crash")
    sock = settings.socket_path.with_name("activated.sock")
    env = daemon_env(settings)
    proc = await spawn(
        socket_activate, "-l", str(sock), *forwarded_env(env), *loader_command(), "serve", env=env
    )
    assert proc.stderr is not None
    assert b"Listening on" in await asyncio.wait_for(proc.stderr.readline(), 10)
    data = os.urandom(2_000_000)
    form, content_type = upload_form(data, "models")
    async with session_for(sock) as session:
        # This connection starts the daemon; the upload follows as soon as the login is in.
        async with session.post(
            "http://loader/login", json={"email": EMAIL, "password": PASSWORD}
        ) as resp:
            assert resp.status == 200
        async with session.post(
            "http://loader/upload/model.bin",
            data=io.BytesIO(form),
            headers={"Content-Type": content_type},
        ) as resp:
            assert resp.status == 200, await resp.text()
        async with session.post(
            "http://loader/load/model.bin", json={"filename": "model.bin", "folder": "models"}
        ) as resp:
            assert (resp.status, await resp.read()) == (200, data)
    assert [path for path in debris if path.exists()] == []
    code, err = await stop(proc)
    assert code == 0, err
    assert err.index("removed 3000 partial cache files") < err.index("serving on")


async def test_shutdown_with_a_download_in_flight_and_no_caller(
    spawn: Spawn, settings: Settings, emulator: RunningEmulator
) -> None:
    proc = await spawn(*loader_command(), "serve", env=daemon_env(settings, SHUTDOWN_GRACE="1"))
    await wait_for(lambda: socket_answers(settings.socket_path), what="the socket")
    data = os.urandom(1_000_000)
    form, content_type = upload_form(data, "models")
    async with session_for(settings.socket_path) as session:
        async with session.post(
            "http://loader/login", json={"email": EMAIL, "password": PASSWORD}
        ) as resp:
            assert resp.status == 200
        async with session.post(
            "http://loader/upload/model.bin",
            data=io.BytesIO(form),
            headers={"Content-Type": content_type},
        ) as resp:
            assert resp.status == 200
    (settings.model_cache_dir / "models" / "model.bin.big").unlink()
    cdn = "/cdn/models/model.bin.big"
    emulator.emulator.add_rule(FaultRule(method="GET", path_prefix=cdn, kind="delay", delay=60))
    # A caller asks for it, and hangs up while the download waits on the CDN.
    async with session_for(settings.socket_path) as session:
        asking = asyncio.create_task(
            session.post(
                "http://loader/load/model.bin", json={"filename": "model.bin", "folder": "models"}
            )
        )
        await wait_for(lambda: emulator.emulator.requests("GET", cdn), what="the download")
        asking.cancel()
        await asyncio.gather(asking, return_exceptions=True)
    code, err = await stop(proc)
    assert code == 0, err
    assert "stopping the download of models/model.bin.big" in err
    assert "never retrieved" not in err
    assert "Traceback" not in err
    assert not list((settings.model_cache_dir).glob(".*.part"))
