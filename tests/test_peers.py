"""Callers by their peer credentials: named in the access log, refused by ALLOWED_* with 403."""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from loader.settings import Settings
from tests.conftest import LocalApp, skip_or_fail

PROBE = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
request = "GET " + sys.argv[2] + " HTTP/1.1\\r\\nHost: loader\\r\\nConnection: close\\r\\n\\r\\n"
s.sendall(request.encode())
answer = b""
while chunk := s.recv(65536):
    answer += chunk
head, _, body = answer.partition(b"\\r\\n\\r\\n")
print(head.split()[1].decode(), body.decode())
"""


@dataclass
class User:
    name: str
    uid: int
    gid: int


@pytest.fixture(scope="module")
def users() -> Iterator[dict[str, User]]:
    """Two throwaway system users: `insider` in group azl-callers, `outsider` not."""
    if os.geteuid() != 0:
        skip_or_fail("creating users needs root")
    made: list[str] = []
    try:
        subprocess.run(["groupadd", "--system", "azl-callers"], check=True)
        for name, extra in (("azl-insider", ["-G", "azl-callers"]), ("azl-outsider", [])):
            subprocess.run(
                [
                    "useradd",
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    *extra,
                    name,
                ],
                check=True,
            )
            made.append(name)
        yield {
            name.removeprefix("azl-"): User(
                name, pwd.getpwnam(name).pw_uid, pwd.getpwnam(name).pw_gid
            )
            for name in made
        }
    finally:
        for name in made:
            subprocess.run(["userdel", name], check=False)
        subprocess.run(["groupdel", "azl-callers"], check=False)


async def health_as(user: User, app: LocalApp, path: str = "/health") -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "setpriv",
        f"--reuid={user.uid}",
        f"--regid={user.gid}",
        "--init-groups",
        sys.executable,
        "-c",
        PROBE,
        str(app.socket),
        path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err
    status, _, body = out.decode().partition(" ")
    return int(status), body


async def open_to_all(make_local_app: Callable[[Settings], Any], settings: Settings) -> LocalApp:
    app: LocalApp = await make_local_app(settings)
    # The socket's mode is not what is tested here: let any user connect.
    os.chmod(app.socket, 0o666)  # noqa: S103
    os.chmod(app.socket.parent, 0o755)  # noqa: S103
    return app


async def test_without_allowed_lists_anyone_who_connects_is_served(
    make_local_app: Callable[[Settings], Any], settings: Settings, users: dict[str, User]
) -> None:
    app = await open_to_all(make_local_app, settings)
    assert (await health_as(users["outsider"], app))[0] == 200


async def test_allowed_groups_refuses_others_with_403(
    make_local_app: Callable[[Settings], Any],
    with_settings: Callable[..., Settings],
    users: dict[str, User],
) -> None:
    import grp

    callers = grp.getgrnam("azl-callers").gr_gid
    app = await open_to_all(make_local_app, with_settings(allowed_groups=(callers,)))
    assert (await health_as(users["insider"], app))[0] == 200
    status, body = await health_as(users["outsider"], app)
    assert status == 403
    assert f"uid {users['outsider'].uid} is not allowed" in body
    assert '"code": "forbidden"' in body


async def test_allowed_uids(
    make_local_app: Callable[[Settings], Any],
    with_settings: Callable[..., Settings],
    users: dict[str, User],
) -> None:
    app = await open_to_all(make_local_app, with_settings(allowed_uids=(users["outsider"].uid,)))
    assert (await health_as(users["outsider"], app))[0] == 200
    assert (await health_as(users["insider"], app))[0] == 403


async def test_metrics_obey_the_allowed_lists_like_every_path(
    make_local_app: Callable[[Settings], Any],
    with_settings: Callable[..., Settings],
    users: dict[str, User],
) -> None:
    app = await open_to_all(make_local_app, with_settings(allowed_uids=(users["insider"].uid,)))
    status, body = await health_as(users["insider"], app, "/metrics")
    assert status == 200
    assert "azaion_loader_build_info" in body
    status, body = await health_as(users["outsider"], app, "/metrics")
    assert status == 403
    assert '"code": "forbidden"' in body


async def test_the_access_log_names_the_caller(
    local: LocalApp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="aiohttp.access")
    async with local.session.get(local.url("/health")) as resp:
        assert resp.status == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    me = f"pid={os.getpid()} uid={os.getuid()} gid={os.getgid()}"
    assert any(line.startswith(me) and '"GET /health" 200' in line for line in lines), lines
