"""The Resource API client verifies TLS: a self-signed certificate fails clearly, unless trusted."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from loader.app import client_tls
from loader.errors import RemoteUntrusted
from loader.log import Redactor
from loader.remote import ResourceAPI
from loader.settings import Settings
from tests.conftest import ARCHIVE_FRAGMENT, EMAIL, PASSWORD, RESOURCE_FRAGMENT
from tests.emulator import Emulator, EmulatorConfig, make_app


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made by openssl."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=azaion-test",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture
async def https_emulator(
    aiohttp_server: Callable[..., Any], certificate: tuple[Path, Path], tmp_path: Path
) -> str:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    emulator = Emulator(
        EmulatorConfig(
            users={EMAIL: PASSWORD},
            archive_fragment=ARCHIVE_FRAGMENT,
            resource_fragment=RESOURCE_FRAGMENT,
            storage_dir=tmp_path / "tls-emulator",
        )
    )
    server = await aiohttp_server(make_app(emulator), ssl=context)
    return f"https://127.0.0.1:{server.port}"


async def test_self_signed_fails_with_a_clear_message(
    settings: Settings, https_emulator: str
) -> None:
    untrusting = Settings(resource_api_url=https_emulator, cdn_url=https_emulator + "/cdn")
    async with aiohttp.ClientSession() as session:
        api = ResourceAPI(session, untrusting, Redactor())
        with pytest.raises(RemoteUntrusted, match=r"TLS certificate is not trusted.*TLS_CA_FILE"):
            await api.login(EMAIL, PASSWORD)


async def test_a_configured_ca_file_is_trusted(
    make_local_app: Callable[[Settings], Any],
    with_settings: Callable[..., Settings],
    https_emulator: str,
    certificate: tuple[Path, Path],
) -> None:
    app = await make_local_app(
        with_settings(
            resource_api_url=https_emulator,
            cdn_url=https_emulator + "/cdn",
            tls_ca_file=certificate[0],
        )
    )
    async with app.session.post(
        app.url("/login"), json={"email": EMAIL, "password": PASSWORD}
    ) as resp:
        assert resp.status == 200
    untrusting = await make_local_app(
        with_settings(resource_api_url=https_emulator, cdn_url=https_emulator + "/cdn")
    )
    async with untrusting.session.post(
        untrusting.url("/login"), json={"email": EMAIL, "password": PASSWORD}
    ) as resp:
        assert resp.status == 502
        assert (await resp.json())["code"] == "remote-untrusted"


async def _login_with(tls: ssl.SSLContext, url: str) -> None:
    settings = Settings(resource_api_url=url, cdn_url=url + "/cdn")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls)) as session:
        await ResourceAPI(session, settings, Redactor()).login(EMAIL, PASSWORD)


@pytest.fixture
def ca_folders(certificate: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path, Path]:
    """The test's CA in a folder hashed by `openssl rehash`, the same unhashed, and none."""
    folders = tmp_path / "hashed", tmp_path / "unhashed", tmp_path / "empty"
    for folder in folders:
        folder.mkdir()
    for folder in folders[:2]:
        (folder / "azaion-test.pem").write_bytes(certificate[0].read_bytes())
    subprocess.run(["openssl", "rehash", str(folders[0])], check=True, capture_output=True)
    assert len(list(folders[0].iterdir())) == 2, "no hash link"
    return folders


async def test_the_system_cas_are_read_from_their_hashed_folder(
    https_emulator: str, certificate: tuple[Path, Path], ca_folders: tuple[Path, Path, Path]
) -> None:
    """client_tls trusts a CA found in a hashed folder (as update-ca-certificates makes
    /etc/ssl/certs), read at the handshake; a folder without it, or without hash links, is
    not trusted (the latter falls back to OpenSSL's defaults, which lack the test's CA)."""
    hashed, unhashed, empty = ca_folders
    await _login_with(client_tls(None, capath=str(hashed), env={}), https_emulator)
    for folder in (unhashed, empty):
        with pytest.raises(RemoteUntrusted):
            await _login_with(client_tls(None, capath=str(folder), env={}), https_emulator)
    # SSL_CERT_FILE or SSL_CERT_DIR set: OpenSSL's defaults, which follow them, not the folder.
    for variable in ("SSL_CERT_FILE", "SSL_CERT_DIR"):
        tls = client_tls(None, capath=str(hashed), env={variable: "/etc/ssl/certs"})
        with pytest.raises(RemoteUntrusted):
            await _login_with(tls, https_emulator)
    # The system's own folder, as the daemon uses it: Debian's has its hash links.
    with pytest.raises(RemoteUntrusted):
        await _login_with(client_tls(None), https_emulator)
    await _login_with(client_tls(certificate[0]), https_emulator)
