"""A bad setting under socket activation: the requests waiting get 503 config-error, then
the daemon exits 78, leaving nothing queued that would start it again at once."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
from pathlib import Path

from loader.settings import Settings
from loader.systemd import answer_waiting
from tests.conftest import Spawn, daemon_env, loader_command, session_for, skip_or_fail

BODY = json.dumps({"detail": "configuration error: X", "code": "config-error"}).encode()


def _queued(path: Path, request: bytes) -> socket.socket:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(5)
    client.connect(str(path))
    client.sendall(request)
    return client


def _answer(client: socket.socket) -> bytes:
    data = b""
    while chunk := client.recv(4096):
        data += chunk
    client.close()
    return data


def test_every_waiting_request_is_answered_and_none_is_reset(short_dir: Path) -> None:
    path = short_dir / "l.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    body = json.dumps({"email": "a@b", "password": "p" * 5000}).encode()
    clients = [
        _queued(path, b"GET /health HTTP/1.1\r\nHost: loader\r\n\r\n"),
        _queued(
            path,
            b"POST /login HTTP/1.1\r\nHost: loader\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body,
        ),
    ]
    assert answer_waiting(listener, "503 Service Unavailable", BODY) == 2
    for client in clients:
        head, _, rest = _answer(client).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), head
        assert rest == BODY
    # Nothing is left in the backlog, and an empty one is not waited on.
    assert answer_waiting(listener, "503 Service Unavailable", BODY) == 0
    listener.close()


async def test_socket_activated_daemon_with_a_bad_setting_answers_then_exits_78(
    spawn: Spawn, settings: Settings, short_dir: Path
) -> None:
    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        skip_or_fail("systemd-socket-activate is missing (Debian's systemd package)")
    assert tool is not None
    env = daemon_env(settings, LOG_LEVEL="loud")
    forwarded = [
        f"-E{name}={env[name]}" for name in sorted(env) if name.isupper() and name != "PATH"
    ]
    sock = short_dir / "a.sock"
    proc = await spawn(tool, "-l", str(sock), *forwarded, *loader_command(), "serve", env=env)
    assert proc.stderr is not None
    line = await asyncio.wait_for(proc.stderr.readline(), 10)
    assert b"Listening on" in line, line
    async with session_for(sock) as session, session.get("http://loader/health") as resp:
        assert resp.status == 503
        answer = await resp.json()
    assert answer["code"] == "config-error"
    assert answer["detail"].startswith("configuration error: LOG_LEVEL"), answer
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 78, err
    assert b"answered 1 waiting request(s) with 503 config-error" in err, err
