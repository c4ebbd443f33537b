"""A schema-driven fuzz run: schemathesis generates requests from the daemon's own
/openapi.json, sends them to a daemon process on its Unix socket, and checks every answer:
no 5xx, a status the document lists, a body that matches the document, and invalid input
refused with a 4xx.

schemathesis speaks HTTP through `requests`; a small adapter carries it over the socket.
The calls block, so the run is in a worker thread while the event loop serves the emulator.
"""

from __future__ import annotations

import asyncio
import collections
import json
import socket
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from requests.adapters import HTTPAdapter
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool

from tests.dockerd import PrivateDockerd
from tests.faults.conftest import StartDaemon

pytestmark = pytest.mark.docker

EXAMPLES = 50
BASE_URL = "http://loader"


class _UnixConnection(HTTPConnection):
    socket_path = ""

    def _new_conn(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(self.socket_path)
        return sock


class UnixAdapter(HTTPAdapter):
    """`requests` over a Unix socket, whatever the URL's host."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._pool = HTTPConnectionPool("localhost", maxsize=1)
        self._pool.ConnectionCls = type(
            "Connection", (_UnixConnection,), {"socket_path": str(path)}
        )

    def get_connection_with_tls_context(
        self, request: Any, verify: Any, proxies: Any = None, cert: Any = None
    ) -> HTTPConnectionPool:
        return self._pool

    def get_connection(self, url: Any, proxies: Any = None) -> HTTPConnectionPool:
        # requests < 2.32.2 (Debian 12's 2.28.1) asks this one instead.
        return self._pool

    def close(self) -> None:
        self._pool.close()
        super().close()


def fuzz_operation(
    operation: Any,
    mode: Any,
    session: requests.Session,
    seen: collections.Counter[str],
) -> None:
    """EXAMPLES requests for one operation; raises on the first answer that fails a check."""
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    # A multipart form carries text only: a "boolean" folder arrives as the text "false",
    # a valid name, so a type violation there cannot be told from valid data on the wire.
    multipart = "multipart/form-data" in str(operation.definition.raw.get("requestBody", ""))
    if mode is GenerationMode.NEGATIVE and not multipart:
        checks.append(negative_data_rejection)

    @hsettings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        response = case.call(base_url=BASE_URL, session=session, timeout=30)
        seen[f"{operation.label} {mode.value}: {response.status_code}"] += 1
        case.validate_response(response, checks=checks)

    run()


def fuzz(schema: Any, path: Path) -> tuple[list[str], collections.Counter[str]]:
    """Every operation, positive and (where it has input) negative; failures and answers."""
    failures: list[str] = []
    seen: collections.Counter[str] = collections.Counter()
    session = requests.Session()
    session.mount(BASE_URL, UnixAdapter(path))
    try:
        for result in schema.get_all_operations():
            operation = result.ok()
            # GenerationMode is a StrEnum, which mypy sees as str for Python 3.10.
            modes: list[Any] = [GenerationMode.POSITIVE]
            if operation.path_parameters or len(operation.body):
                modes.append(GenerationMode.NEGATIVE)
            for mode in modes:
                try:
                    fuzz_operation(operation, mode, session, seen)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except BaseException as exc:  # schemathesis' FailureGroup is an ExceptionGroup
                    failures.append(f"{operation.label} ({mode.value}): {exc}")
    finally:
        session.close()
    return failures, seen


async def test_schema_driven_fuzz(
    start_daemon: StartDaemon,
    private_dockerd: PrivateDockerd,
    no_stack_images: list[str],
    tmp_path: Path,
) -> None:
    # Docker is there but lacks the images, and there is no archive: /unlock answers 404.
    daemon = await start_daemon(private_dockerd, images_path=tmp_path / "absent.enc")
    client = daemon.scene.client()
    assert (await client.login())[0] == 200  # so that /load and /upload go all the way
    status, document = await client.request("GET", "/openapi.json")
    assert status == 200
    schema = schemathesis.openapi.from_dict(json.loads(document))
    failures, seen = await asyncio.to_thread(fuzz, schema, daemon.scene.socket)
    assert not failures, "\n\n".join(failures)
    # Every operation was exercised, and nothing answered 5xx.
    operations = sum(len(methods) for methods in json.loads(document)["paths"].values())
    assert len({key.split(":")[0].rsplit(" ", 1)[0] for key in seen}) == operations, seen
    assert not [key for key in seen if key.endswith((": 500", ": 502", ": 503"))], seen
    assert daemon.running
    assert "Traceback" not in daemon.log()
    await daemon.scene.assert_after()
