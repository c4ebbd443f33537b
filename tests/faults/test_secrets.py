"""A secrets scan: the daemon runs every flow at LOG_LEVEL=debug with a known password,
known fragments and the tokens the emulator issues; then no log line, no file it wrote and
no answer it gave holds any of them, as text, hex, repr or base64."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from pathlib import Path

import pytest

from tests.conftest import (
    ARCHIVE_FRAGMENT,
    EMAIL,
    PASSWORD,
    RESOURCE_FRAGMENT,
    NotifyListener,
    RunningEmulator,
)
from tests.dockerd import ArchiveInfo, PrivateDockerd
from tests.emulator import FaultRule
from tests.faults.conftest import FOLDER, StartDaemon, assert_clear_error, files_under

pytestmark = pytest.mark.docker

WRONG_PASSWORD = "Tr0ub4dor&3-not-it"


def forms(secret: str | bytes) -> set[bytes]:
    """The ways a secret could show up in a log line, a file or an answer."""
    raw = secret.encode() if isinstance(secret, str) else secret
    found = {
        raw,
        raw.hex().encode(),
        raw.hex().upper().encode(),
        repr(raw).encode(),
        repr(raw)[2:-1].encode(),  # the repr's inside, as in an f-string of the bytes
        base64.b64encode(raw),
        base64.urlsafe_b64encode(raw).rstrip(b"="),
        raw.decode("utf-8", "replace").encode(),
        raw.decode("latin-1").encode(),
    }
    if isinstance(secret, str):
        found.add(repr(secret).encode())
    return {f for f in found if len(f) >= 8}


def leaks(blob: bytes, secrets: dict[str, set[bytes]]) -> list[str]:
    return [name for name, shapes in secrets.items() if any(s in blob for s in shapes)]


async def test_no_secret_in_logs_files_or_answers(
    start_daemon: StartDaemon,
    emulator: RunningEmulator,
    private_dockerd: PrivateDockerd,
    image_archive: ArchiveInfo,
    no_stack_images: list[str],
    short_dir: Path,
    notify: NotifyListener,
) -> None:
    tokens = emulator.emulator.issued_tokens
    collecting = asyncio.create_task(notify.collect())
    daemon = await start_daemon(
        private_dockerd,
        env={"NOTIFY_SOCKET": str(notify.path)},
        images_path=image_archive.path,
        log_level="debug",
    )
    client = daemon.scene.client(limit=60)

    # A wrong password, at /login and at /unlock.
    status, body = await client.login(WRONG_PASSWORD)
    assert_clear_error(status, body, 401, "wrong-credentials")
    assert (await client.unlock(WRONG_PASSWORD))[0] == 200
    assert (await client.settled())["state"] == "error"
    # An API that echoes the body it refuses, as FastAPI's 422 does: the password with it.
    emulator.emulator.add_rule(FaultRule(method="POST", path_prefix="/login", kind="echo", count=2))
    status, body = await client.login(WRONG_PASSWORD)
    assert_clear_error(status, body, 502, "remote-refused", "HTTP 422")
    assert (await client.unlock(WRONG_PASSWORD))[0] == 200
    failed = await client.settled()
    assert (failed["state"], "HTTP 422" in failed["error"]) == ("error", True), failed
    # The right one; the unlock against the private dockerd.
    assert (await client.login())[0] == 200
    assert (await client.unlock())[0] == 200
    assert (await client.settled())["state"] == "ready"
    # Upload and load.
    data = os.urandom(200_000)
    assert (await client.upload("secret-model.bin", data))[0] == 200
    loaded = await client.load("secret-model.bin")
    assert (loaded.status, loaded.body) == (200, data)
    # The token expires: the daemon logs in again by itself, for a load and an upload.
    emulator.emulator.revoke_tokens()
    (daemon.scene.cache / FOLDER / "secret-model.bin.big").unlink()
    loaded = await client.load("secret-model.bin")
    assert (loaded.status, loaded.body) == (200, data)
    emulator.emulator.revoke_tokens()
    assert (await client.upload("second.bin", data))[0] == 200
    # API errors: a 5xx that lasts, a refusal whose body the loader quotes, a 401 for good.
    emulator.emulator.add_rule(
        FaultRule(method="POST", path_prefix="/resources/get/", kind="status", count=None)
    )
    loaded = await client.load("secret-model.bin")
    assert_clear_error(loaded.status, loaded.body, 502, "remote-refused")
    emulator.emulator.clear_faults()
    emulator.emulator.add_rule(
        FaultRule(method="GET", path_prefix="/resources/key-fragment", kind="status", status=403)
    )
    loaded = await client.load("secret-model.bin")
    assert_clear_error(loaded.status, loaded.body, 502, "remote-refused", "fault injected")
    emulator.emulator.revoke_tokens()
    emulator.emulator.add_rule(
        FaultRule(method="POST", path_prefix="/login", kind="status", status=401, count=None)
    )
    loaded = await client.load("secret-model.bin")
    assert_clear_error(loaded.status, loaded.body, 401, "not-authenticated")
    emulator.emulator.clear_faults()
    await client.request("GET", "/status")
    await client.request("GET", "/unlock/status")
    metrics = await client.request("GET", "/metrics")
    assert b"azaion_loader_unlock_attempts_total" in metrics[1], metrics
    assert (await daemon.terminate(15)) == 0

    assert len(tokens) >= 4, tokens
    secrets: dict[str, set[bytes]] = {
        "the password": forms(PASSWORD),
        "the wrong password": forms(WRONG_PASSWORD),
        "the archive fragment": forms(ARCHIVE_FRAGMENT),
        "the resource fragment": forms(RESOURCE_FRAGMENT),
        "the archive key": forms(hashlib.sha256(ARCHIVE_FRAGMENT).digest()),
        "the resource key": forms(hashlib.sha256(RESOURCE_FRAGMENT).digest()),
        **{f"token {i}": forms(token) for i, token in enumerate(tokens)},
    }
    log = daemon.log_path.read_bytes()
    assert b"<7>" in log, "LOG_LEVEL=debug gave no debug line"
    assert EMAIL.encode() in log  # the scan does look at a log that talks about the login
    found = []
    for number, line in enumerate(log.splitlines(), 1):
        found += [f"log line {number} holds {name}" for name in leaks(line, secrets)]
    written = files_under(daemon.scene.cache, daemon.scene.scratch, short_dir)
    assert written, "the daemon wrote no file to scan"
    for path in written:
        if path.is_file():
            found += [f"{path} holds {name}" for name in leaks(path.read_bytes(), secrets)]
    assert len(client.answers) > 20
    for number, answer in enumerate(client.answers, 1):
        found += [f"answer {number} holds {name}" for name in leaks(answer, secrets)]
    collecting.cancel()
    await asyncio.gather(collecting, return_exceptions=True)
    statuses = notify.drain()
    assert any("Unlock failed" in status for status in statuses), statuses
    for status in statuses:
        found += [f"STATUS= {status!r} holds {name}" for name in leaks(status.encode(), secrets)]
    assert not found, "\n".join(found)
