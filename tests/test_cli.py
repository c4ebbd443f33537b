"""The `azaion-loader` client commands, run as a person would, against a daemon process."""

from __future__ import annotations

import asyncio
import json
import os
import pty
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from loader.settings import Settings
from tests.conftest import (
    EMAIL,
    PASSWORD,
    RunningEmulator,
    Spawn,
    daemon_env,
    loader_command,
    skip_or_fail,
    socket_answers,
    wait_for,
)
from tests.dockerd import ArchiveInfo, PrivateDockerd


class Result:
    def __init__(self, code: int, out: bytes, err: bytes) -> None:
        self.code = code
        self.out = out.decode(errors="replace")
        self.err = err.decode(errors="replace")
        self.raw = out


async def cli(
    *args: str, socket: Path | None = None, stdin: bytes = b"", env: dict[str, str] | None = None
) -> Result:
    command = [*loader_command(), *args]
    if socket is not None:
        command += ["--socket", str(socket)]
    proc = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env or {k: v for k, v in os.environ.items() if k != "LOADER_SOCKET"},
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 180)
    assert proc.returncode is not None
    return Result(proc.returncode, out, err)


@pytest.fixture
async def daemon(spawn: Spawn, settings: Settings) -> Callable[..., Any]:
    """Start the daemon as a process; returns its socket."""

    async def start(**env: str) -> Path:
        await spawn(*loader_command(), "serve", env=daemon_env(settings, **env))
        await wait_for(lambda: socket_answers(settings.socket_path), what="the daemon")
        return settings.socket_path

    return start


async def test_status_in_aligned_lines_and_as_json(daemon: Callable[..., Any]) -> None:
    sock = await daemon()
    result = await cli("status", socket=sock)
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "daemon",
        "logged in",
        "model cache",
        "unlock",
    ]
    assert len({line.index(line.split(":", 1)[1].strip()) for line in lines}) == 1
    assert "healthy on" in lines[0]
    assert lines[1].endswith("no")
    raw = await cli("status", "--json", socket=sock)
    answers = json.loads(raw.out)
    assert answers["health"] == {"status": "healthy"}
    assert answers["status"]["authenticated"] is False
    assert answers["unlock"]["state"] == "idle"


async def test_login_reads_the_password_from_stdin(daemon: Callable[..., Any]) -> None:
    sock = await daemon()
    result = await cli(
        "login", "--email", EMAIL, "--password-stdin", socket=sock, stdin=PASSWORD.encode() + b"\n"
    )
    assert (result.code, result.out.strip()) == (0, f"logged in as {EMAIL}")
    assert "yes" in (await cli("status", socket=sock)).out.splitlines()[1]


async def test_wrong_password_says_so_and_exits_1(daemon: Callable[..., Any]) -> None:
    sock = await daemon()
    typo = b"a-typo\n"
    result = await cli("login", "--email", EMAIL, "--password-stdin", socket=sock, stdin=typo)
    assert result.code == 1
    assert result.err.strip() == "azaion-loader: wrong email or password"


async def test_no_socket_exits_3_and_says_what_to_do(short_dir: Path) -> None:
    result = await cli("status", socket=short_dir / "none.sock")
    assert result.code == 3
    assert f"cannot reach the daemon at {short_dir}/none.sock: no such socket" in result.err


async def test_permission_denied_says_to_join_the_group(daemon: Callable[..., Any]) -> None:
    if os.geteuid() != 0:
        skip_or_fail("needs root to run the client as another user")
    sock = await daemon()
    os.chmod(sock.parent, 0o755)  # noqa: S103 - the socket itself stays 0660 root:root
    proc = await asyncio.create_subprocess_exec(
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        *loader_command(),
        "status",
        "--socket",
        str(sock),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 3
    assert "permission denied" in err.decode()
    assert "join the azaion-loader group" in err.decode()


async def test_upload_then_load_to_a_file_and_to_stdout(
    daemon: Callable[..., Any], tmp_path: Path
) -> None:
    sock = await daemon()
    await cli("login", "--email", EMAIL, "--password-stdin", socket=sock, stdin=PASSWORD.encode())
    model = tmp_path / "model.onnx"
    model.write_bytes(os.urandom(700_000))
    up = await cli("upload", str(model), "--folder", "models", socket=sock)
    assert up.code == 0, up.err
    assert "uploaded models/model.onnx (700000 bytes)" in up.err
    out = tmp_path / "out" / "copy.onnx"
    out.parent.mkdir()
    down = await cli("load", "models/model.onnx", "-o", str(out), socket=sock)
    assert down.code == 0, down.err
    assert out.read_bytes() == model.read_bytes()
    assert [p.name for p in out.parent.iterdir()] == ["copy.onnx"]
    piped = await cli("load", "models/model.onnx", "-o", "-", socket=sock)
    assert piped.code == 0
    assert piped.raw == model.read_bytes()


async def test_load_of_a_missing_resource_leaves_no_file(
    daemon: Callable[..., Any], tmp_path: Path
) -> None:
    sock = await daemon()
    await cli("login", "--email", EMAIL, "--password-stdin", socket=sock, stdin=PASSWORD.encode())
    result = await cli("load", "models/absent.bin", "-o", str(tmp_path / "x"), socket=sock)
    assert result.code == 1
    assert "has no small part of models/absent.bin" in result.err
    assert not any(tmp_path.iterdir())  # noqa: ASYNC240


@pytest.mark.parametrize("command", ["status", "login", "unlock", "load", "upload", "metrics"])
async def test_help_shows_an_example_and_the_exit_codes(command: str) -> None:
    result = await cli(command, "--help")
    assert result.code == 0
    assert f"example:\n  azaion-loader {command}" in result.out
    assert "3 cannot reach the daemon" in result.out


async def test_usage_errors_exit_2() -> None:
    assert (await cli("load")).code == 2


@pytest.fixture
async def unlock_daemon(
    daemon: Callable[..., Any], private_dockerd: PrivateDockerd, no_stack_images: list[str]
) -> Callable[..., Any]:
    async def start(archive: ArchiveInfo) -> Path:
        sock: Path = await daemon(DOCKER_HOST=private_dockerd.host, IMAGES_PATH=str(archive.path))
        return sock

    return start


@pytest.mark.docker
async def test_unlock_prints_plain_lines_when_not_a_terminal(
    unlock_daemon: Callable[..., Any], big_archive: ArchiveInfo
) -> None:
    sock = await unlock_daemon(big_archive)
    result = await cli(
        "unlock", "--email", EMAIL, "--password-stdin", socket=sock, stdin=PASSWORD.encode()
    )
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert "\r" not in result.out
    assert lines[-1] == "unlock: ready: 7 images loaded"
    assert any(line.startswith("unlock: loading image ") and " of 7 " in line for line in lines), (
        lines
    )
    assert len(lines) <= 20, lines  # per stage or per 10%, not per poll


@pytest.mark.docker
async def test_unlock_error_exits_1_with_the_message(
    unlock_daemon: Callable[..., Any], image_archive: ArchiveInfo, emulator: RunningEmulator
) -> None:
    emulator.emulator.config = replace(emulator.emulator.config, archive_fragment=b"wrong")
    sock = await unlock_daemon(image_archive)
    result = await cli(
        "unlock", "--email", EMAIL, "--password-stdin", socket=sock, stdin=PASSWORD.encode()
    )
    assert result.code == 1
    assert "the archive could not be decrypted" in result.out


@pytest.mark.docker
async def test_unlock_no_wait_returns_at_once(
    unlock_daemon: Callable[..., Any], big_archive: ArchiveInfo
) -> None:
    sock = await unlock_daemon(big_archive)
    result = await cli(
        "unlock",
        "--email",
        EMAIL,
        "--password-stdin",
        "--no-wait",
        socket=sock,
        stdin=PASSWORD.encode(),
    )
    assert (result.code, result.out.strip()) == (0, "unlock: authenticating")

    async def ready() -> bool:
        return "ready (7 images)" in (await cli("status", socket=sock)).out

    await wait_for(ready, timeout=120, what="status to show the unlock ready")


@pytest.mark.docker
async def test_unlock_draws_a_bar_on_a_terminal(
    unlock_daemon: Callable[..., Any], big_archive: ArchiveInfo
) -> None:
    sock = await unlock_daemon(big_archive)
    leader, follower = pty.openpty()
    proc = await asyncio.create_subprocess_exec(
        *loader_command(),
        "unlock",
        "--email",
        EMAIL,
        "--password-stdin",
        "--socket",
        str(sock),
        stdin=asyncio.subprocess.PIPE,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    assert proc.stdin is not None
    proc.stdin.write(PASSWORD.encode() + b"\n")
    proc.stdin.close()
    screen = b""
    loop = asyncio.get_running_loop()
    while True:
        try:
            chunk = await loop.run_in_executor(None, os.read, leader, 65536)
        except OSError:  # EIO once the child has closed the terminal
            break
        if not chunk:
            break
        screen += chunk
    os.close(leader)
    assert await asyncio.wait_for(proc.wait(), 60) == 0
    text = screen.decode(errors="replace")
    assert "\r[" in text  # a bar, redrawn in place
    assert "% " in text
    assert "/s " in text
    assert " left" in text
    assert text.rstrip().endswith("unlock: ready: 7 images loaded")
