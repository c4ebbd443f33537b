"""The Resource API and CDN emulator over real HTTP: the contract, its faults, its CLI."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st
from yarl import URL

from tests.conftest import wait_for
from tests.emulator import Emulator, EmulatorConfig, FaultKind, FaultRates, FaultRule, make_app
from tests.emulator.responses import ByteRange, RangeNotSatisfiable, parse_byte_range

USER = "pilot@azaion.test"
PASSWORD = "s3cret-pass:with-colon"
ARCHIVE = b"archive-fragment-7f3a\x00\xff"
RESOURCE = b"resource-fragment-91c2\x01\xfe"
TTL = 60.0
BIG = os.urandom(3 * 1024 * 1024 + 17)  # past the store's 1 MiB write batches
ROOT = Path(__file__).resolve().parents[1]
DEADLINE = 30.0


class FakeClock:
    """Monotonic time that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def log_in(http: aiohttp.ClientSession) -> str:
    async with http.post("/login", json={"email": USER, "password": PASSWORD}) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert isinstance(body["token"], str)
    return body["token"]


@dataclass
class Api:
    emulator: Emulator
    http: aiohttp.ClientSession
    url: str

    async def token(self) -> str:
        return await log_in(self.http)

    async def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {await self.token()}"}

    async def put_big(self, path: str, data: bytes) -> int:
        headers = await self.auth()
        async with self.http.put(path, data=io.BytesIO(data), headers=headers) as resp:
            return resp.status

    async def upload_small(self, folder: str, file_name: str, data: bytes) -> int:
        form = aiohttp.FormData()
        form.add_field("data", data, filename=file_name)
        headers = await self.auth()
        async with self.http.post(f"/resources/{folder}", data=form, headers=headers) as resp:
            return resp.status


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def emu(tmp_path: Path, clock: FakeClock) -> Emulator:
    config = EmulatorConfig(
        storage_dir=tmp_path / "parts",
        users={USER: PASSWORD},
        archive_fragment=ARCHIVE,
        resource_fragment=RESOURCE,
        token_ttl=TTL,
    )
    return Emulator(config, clock=clock)


@pytest.fixture
async def api(
    aiohttp_server: Callable[..., Any], emu: Emulator, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[Api]:
    server = await aiohttp_server(make_app(emu))  # on 127.0.0.1
    url = f"http://127.0.0.1:{server.port}"
    async with aiohttp.ClientSession(url) as http:
        yield Api(emu, http, url)
    # Faults are on purpose: the server must take them quietly.
    errors = [r.getMessage() for r in caplog.get_records("call") if r.levelno >= logging.ERROR]
    assert errors == []


async def read_until_error(resp: aiohttp.ClientResponse) -> bytes:
    """What arrives of a body that must end in a payload error."""
    received = bytearray()

    async def drain() -> None:
        async for chunk in resp.content.iter_any():
            received.extend(chunk)

    with pytest.raises(aiohttp.ClientPayloadError):
        await drain()
    return bytes(received)


def flipped(data: bytes, offset: int) -> bytes:
    """``data`` with the lowest bit of byte ``offset`` flipped."""
    altered = bytearray(data)
    altered[offset] ^= 1
    return bytes(altered)


def swapped(data: bytes, start: int) -> bytes:
    """``data`` with the 16-byte blocks at ``start`` and ``start + 16`` swapped."""
    first, second = data[start : start + 16], data[start + 16 : start + 32]
    return data[:start] + second + first + data[start + 32 :]


# Authentication


async def test_login_gives_a_fresh_token_each_time(api: Api) -> None:
    first, second = await api.token(), await api.token()
    assert first != second
    assert len(first) >= 32


@pytest.mark.parametrize(
    "body", [{"email": USER, "password": "wrong"}, {"email": "who@x.y", "password": PASSWORD}]
)
async def test_login_with_wrong_credentials_is_401(api: Api, body: dict[str, str]) -> None:
    async with api.http.post("/login", json=body) as resp:
        assert resp.status == 401
        assert "detail" in await resp.json()


@pytest.mark.parametrize(
    "raw", [b"not json", b"[]", b'{"email": "a@b.c"}', b'{"email": 1, "password": "x"}']
)
async def test_login_with_a_malformed_body_is_422(api: Api, raw: bytes) -> None:
    async with api.http.post("/login", data=raw) as resp:
        assert resp.status == 422
        assert "detail" in await resp.json()


CALLS_NEEDING_A_TOKEN = [
    ("GET", "/binary-split/key-fragment"),
    ("GET", "/resources/key-fragment"),
    ("POST", "/resources/folder"),
    ("POST", "/resources/get/folder"),
    ("PUT", "/cdn/folder/name.big"),
]


@pytest.mark.parametrize(("method", "path"), CALLS_NEEDING_A_TOKEN)
@pytest.mark.parametrize("authorization", [None, "Bearer not-a-token", "Basic dXNlcjpwYXNz"])
async def test_api_calls_need_a_valid_token(
    api: Api, method: str, path: str, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    async with api.http.request(method, path, headers=headers, data=b"x") as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == "Bearer"


async def test_cdn_download_needs_no_token(api: Api) -> None:
    assert await api.put_big("/cdn/folder/name.big", b"big part") == 201
    async with api.http.get("/cdn/folder/name.big") as resp:
        assert resp.status == 200
        assert await resp.read() == b"big part"


async def test_a_token_expires_after_its_ttl(api: Api, clock: FakeClock) -> None:
    headers = await api.auth()
    clock.now += TTL - 0.001
    async with api.http.get("/resources/key-fragment", headers=headers) as resp:
        assert resp.status == 200
    clock.now += 0.001
    async with api.http.get("/resources/key-fragment", headers=headers) as resp:
        assert resp.status == 401
    async with api.http.get("/resources/key-fragment", headers=await api.auth()) as resp:
        assert resp.status == 200


async def test_a_zero_ttl_token_is_never_valid(tmp_path: Path) -> None:
    emu = Emulator(EmulatorConfig(storage_dir=tmp_path, token_ttl=0))
    token = emu.login("dev@azaion.local", "devpass")
    assert token is not None
    assert not emu.token_is_valid(token)


async def test_revoking_tokens_forces_a_new_login(api: Api) -> None:
    headers = await api.auth()
    async with api.http.post("/_emulator/revoke-tokens") as resp:
        assert resp.status == 200
        assert await resp.json() == {"revoked": 1}
    async with api.http.get("/binary-split/key-fragment", headers=headers) as resp:
        assert resp.status == 401
    async with api.http.get("/binary-split/key-fragment", headers=await api.auth()) as resp:
        assert resp.status == 200


# Fragments and parts


@pytest.mark.parametrize(
    ("path", "fragment"),
    [("/binary-split/key-fragment", ARCHIVE), ("/resources/key-fragment", RESOURCE)],
)
async def test_fragments_are_raw_bytes(api: Api, path: str, fragment: bytes) -> None:
    async with api.http.get(path, headers=await api.auth()) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/octet-stream"
        assert await resp.read() == fragment


async def test_parts_come_back_byte_exact(api: Api) -> None:
    small = os.urandom(3072)
    assert await api.upload_small("models", "yolo.small", small) == 201
    assert await api.put_big("/cdn/models/yolo.big", BIG) == 201
    body = {"fileName": "yolo.small"}
    headers = await api.auth()
    async with api.http.post("/resources/get/models", json=body, headers=headers) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/octet-stream"
        assert await resp.read() == small
    async with api.http.get("/cdn/models/yolo.big") as resp:
        assert resp.status == 200
        assert resp.headers["Accept-Ranges"] == "bytes"
        assert resp.content_length == len(BIG)
        assert await resp.read() == BIG


async def test_replacing_parts(api: Api) -> None:
    assert await api.upload_small("f", "n.small", b"old") == 201
    assert await api.upload_small("f", "n.small", b"new") == 201
    assert await api.put_big("/cdn/f/n.big", b"old big") == 201
    assert await api.put_big("/cdn/f/n.big", b"new big") == 204
    headers = await api.auth()
    async with api.http.post(
        "/resources/get/f", json={"fileName": "n.small"}, headers=headers
    ) as r:
        assert await r.read() == b"new"
    async with api.http.get("/cdn/f/n.big") as resp:
        assert await resp.read() == b"new big"


async def test_a_streamed_upload_is_stored_whole(api: Api) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(BIG), 100_000):
            yield BIG[start : start + 100_000]

    headers = await api.auth()
    async with api.http.put("/cdn/f/streamed.big", data=chunks(), headers=headers) as resp:
        assert resp.status == 201
    async with api.http.get("/cdn/f/streamed.big") as resp:
        assert await resp.read() == BIG


async def test_missing_parts_are_404(api: Api) -> None:
    headers = await api.auth()
    async with api.http.post(
        "/resources/get/f", json={"fileName": "none.small"}, headers=headers
    ) as r:
        assert r.status == 404
    async with api.http.get("/cdn/f/none.big") as resp:
        assert resp.status == 404
        assert "detail" in await resp.json()


async def test_an_upload_in_another_field_is_422(api: Api) -> None:
    form = aiohttp.FormData()
    form.add_field("file", io.BytesIO(b"bytes"), filename="n.small")
    async with api.http.post("/resources/f", data=form, headers=await api.auth()) as resp:
        assert resp.status == 422


async def test_an_upload_that_is_not_a_file_is_422(api: Api) -> None:
    form = aiohttp.FormData()
    form.add_field("data", "a text field")
    async with api.http.post("/resources/f", data=form, headers=await api.auth()) as resp:
        assert resp.status == 422


async def test_a_head_request_gets_the_length_only(api: Api) -> None:
    assert await api.put_big("/cdn/f/n.big", BIG) == 201
    async with api.http.head("/cdn/f/n.big") as resp:
        assert resp.status == 200
        assert resp.content_length == len(BIG)
        assert await resp.read() == b""
    assert api.emulator.stats()["downloads"] == {}


# Ranges


@pytest.mark.parametrize(
    ("header", "start", "stop"),
    [
        ("bytes=0-", 0, len(BIG)),
        ("bytes=1000-", 1000, len(BIG)),
        ("bytes=10-19", 10, 20),
        ("bytes=5-5", 5, 6),
        (f"bytes={len(BIG) - 3}-{len(BIG) + 99}", len(BIG) - 3, len(BIG)),
        ("bytes=-100", len(BIG) - 100, len(BIG)),
    ],
)
async def test_a_range_gets_206(api: Api, header: str, start: int, stop: int) -> None:
    assert await api.put_big("/cdn/f/n.big", BIG) == 201
    async with api.http.get("/cdn/f/n.big", headers={"Range": header}) as resp:
        assert resp.status == 206
        assert resp.headers["Content-Range"] == f"bytes {start}-{stop - 1}/{len(BIG)}"
        assert await resp.read() == BIG[start:stop]


@pytest.mark.parametrize(
    "header", [f"bytes={len(BIG)}-", f"bytes={len(BIG) + 5}-9999999", "bytes=-0"]
)
async def test_a_range_past_the_end_is_416(api: Api, header: str) -> None:
    assert await api.put_big("/cdn/f/n.big", BIG) == 201
    async with api.http.get("/cdn/f/n.big", headers={"Range": header}) as resp:
        assert resp.status == 416
        assert resp.headers["Content-Range"] == f"bytes */{len(BIG)}"


@pytest.mark.parametrize(
    "header", ["bytes=9-3", "items=0-1", "bytes=0-1,5-6", "bytes=x-", "bytes=-", "bytes=\u00b2-"]
)
async def test_a_range_not_understood_gets_everything(api: Api, header: str) -> None:
    assert await api.put_big("/cdn/f/n.big", b"0123456789") == 201
    async with api.http.get("/cdn/f/n.big", headers={"Range": header}) as resp:
        assert resp.status == 200
        assert await resp.read() == b"0123456789"


@given(
    size=st.integers(0, 5000),
    first=st.integers(0, 6000) | st.none(),
    last=st.integers(0, 6000) | st.none(),
)
def test_parse_byte_range_follows_rfc_9110(size: int, first: int | None, last: int | None) -> None:
    header = f"bytes={'' if first is None else first}-{'' if last is None else last}"
    if first is None and last is None:
        assert parse_byte_range(header, size) is None
    elif first is None:
        assert last is not None
        if last == 0 or size == 0:
            with pytest.raises(RangeNotSatisfiable):
                parse_byte_range(header, size)
        else:
            assert parse_byte_range(header, size) == ByteRange(max(0, size - last), size)
    elif last is not None and last < first:
        assert parse_byte_range(header, size) is None
    elif first >= size:
        with pytest.raises(RangeNotSatisfiable):
            parse_byte_range(header, size)
    else:
        stop = size if last is None else min(last + 1, size)
        assert parse_byte_range(header, size) == ByteRange(first, stop)


# Names

BAD_NAMES = ["a..b", ".hidden", "-dash", "_under", "sp ace", "semi;colon", "naïve", "x" * 256]


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_bad_names_are_400(api: Api, name: str) -> None:
    headers = await api.auth()
    assert await api.upload_small(name, "n.small", b"x") == 400
    assert await api.upload_small("f", f"{name}.small", b"x") == 400
    body = {"fileName": f"{name}.small"}
    async with api.http.post("/resources/get/f", json=body, headers=headers) as resp:
        assert resp.status == 400
    async with api.http.post(f"/resources/get/{name}", json={"fileName": "n.small"}) as resp:
        assert resp.status in (400, 401)  # no token: refused either way
    for path in (f"/cdn/{name}/n.big", f"/cdn/f/{name}.big"):
        assert await api.put_big(path, b"x") == 400
        async with api.http.get(path) as resp:
            assert resp.status == 400


@pytest.mark.parametrize(
    "path", ["/cdn/f/%2E%2E.big", "/cdn/%2E%2E/n.big", "/cdn/f/a%2Fb.big", "/cdn/f/g/n.big"]
)
async def test_paths_that_escape_are_400(api: Api, path: str) -> None:
    # Through a raw socket, so that no client library normalises the path first.
    url = URL(api.url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), DEADLINE)
    writer.close()
    await writer.wait_closed()
    assert answer.startswith(b"HTTP/1.1 400 ")


@pytest.mark.parametrize("file_name", ["n.big", "n.small.txt", "n", "...small"])
async def test_a_small_part_must_be_named_dot_small(api: Api, file_name: str) -> None:
    assert await api.upload_small("f", file_name, b"x") == 400


async def test_a_name_of_255_characters_fits(api: Api) -> None:
    name = "n" * 255
    assert await api.upload_small("f" * 255, f"{name}.small", b"small") == 201
    assert await api.put_big(f"/cdn/{'f' * 255}/{name}.big", b"big") == 201
    async with api.http.get(f"/cdn/{'f' * 255}/{name}.big") as resp:
        assert await resp.read() == b"big"


# Deterministic faults


async def test_a_status_rule_fires_count_times_then_goes(api: Api) -> None:
    path = "/resources/key-fragment"
    api.emulator.add_rule(FaultRule("GET", path, "status", status=503, count=2))
    headers = await api.auth()
    statuses = []
    for _ in range(3):
        async with api.http.get(path, headers=headers) as resp:
            statuses.append(resp.status)
    assert statuses == [503, 503, 200]
    async with api.http.get("/_emulator/faults") as resp:
        assert (await resp.json())["rules"] == []


async def test_rules_fire_in_order_and_match_method_and_prefix(api: Api) -> None:
    api.emulator.add_rules(
        [
            FaultRule("PUT", "/cdn/", "status", status=500, count=None),
            FaultRule("GET", "/cdn/f/", "status", status=502),
            FaultRule(None, "/cdn/f/", "status", status=504),
        ]
    )
    assert await api.put_big("/cdn/f/n.big", b"x") == 500
    assert await api.put_big("/cdn/f/n.big", b"x") == 500
    statuses = []
    for _ in range(3):
        async with api.http.get("/cdn/f/n.big") as resp:
            statuses.append(resp.status)
    assert statuses == [502, 504, 404]
    async with api.http.get("/cdn/g/n.big") as resp:
        assert resp.status == 404


async def test_a_drop_rule_closes_the_connection_without_an_answer(api: Api) -> None:
    api.emulator.add_rule(FaultRule("POST", "/login", "drop"))
    body = {"email": USER, "password": PASSWORD}
    with pytest.raises(aiohttp.ServerDisconnectedError):
        async with api.http.post("/login", json=body):
            pass
    assert await api.token()


async def test_a_dropped_get_sees_not_one_byte(api: Api) -> None:
    # Through a raw socket: aiohttp's client retries an idempotent request once by itself.
    api.emulator.add_rule(FaultRule("GET", "/cdn/", "drop"))
    url = URL(api.url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    writer.write(b"GET /cdn/f/n.big HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), DEADLINE) == b""
    writer.close()
    await writer.wait_closed()


async def test_a_truncate_rule_cuts_the_body_after_full_headers(api: Api) -> None:
    assert await api.put_big("/cdn/f/n.big", BIG) == 201
    api.emulator.add_rule(FaultRule("GET", "/cdn/f/n.big", "truncate", truncate_at=1000))
    async with api.http.get("/cdn/f/n.big") as resp:
        assert resp.status == 200
        assert resp.content_length == len(BIG)
        assert await read_until_error(resp) == BIG[:1000]
    async with api.http.get("/cdn/f/n.big") as resp:
        assert await resp.read() == BIG


async def test_truncation_defaults_to_half_and_spares_no_answer(api: Api) -> None:
    api.emulator.add_rule(FaultRule("GET", "/binary-split/", "truncate"))
    headers = await api.auth()
    async with api.http.get("/binary-split/key-fragment", headers=headers) as resp:
        assert resp.content_length == len(ARCHIVE)
        assert await read_until_error(resp) == ARCHIVE[: len(ARCHIVE) // 2]
    api.emulator.add_rule(FaultRule("POST", "/login", "truncate", truncate_at=5))
    async with api.http.post("/login", json={"email": USER, "password": PASSWORD}) as resp:
        assert resp.status == 200
        assert await read_until_error(resp) == b'{"tok'


async def test_a_wrong_length_rule_claims_more_than_it_sends(api: Api) -> None:
    assert await api.put_big("/cdn/f/n.big", b"0123456789") == 201
    api.emulator.add_rule(FaultRule("GET", "/cdn/", "wrong-length"))
    async with api.http.get("/cdn/f/n.big") as resp:
        assert resp.content_length == 11
        assert await read_until_error(resp) == b"0123456789"


async def test_an_ignore_range_rule_answers_a_range_in_full(api: Api) -> None:
    assert await api.put_big("/cdn/f/n.big", BIG) == 201
    api.emulator.add_rule(FaultRule("GET", "/cdn/", "ignore-range"))
    async with api.http.get("/cdn/f/n.big") as resp:  # no Range: the rule waits
        assert resp.status == 200
        await resp.read()
    async with api.http.get("/cdn/f/n.big", headers={"Range": "bytes=100-"}) as resp:
        assert resp.status == 200
        assert "Content-Range" not in resp.headers
        assert await resp.read() == BIG
    async with api.http.get("/cdn/f/n.big", headers={"Range": "bytes=100-"}) as resp:
        assert resp.status == 206
        assert await resp.read() == BIG[100:]


async def test_a_delay_rule_holds_the_answer_back(api: Api) -> None:
    api.emulator.add_rule(FaultRule("GET", "/_", "delay", delay=5.0))  # /_emulator: exempt
    api.emulator.add_rule(FaultRule("GET", "/cdn/", "delay", delay=0.3, count=2))
    async with api.http.get("/_emulator/health", timeout=aiohttp.ClientTimeout(total=2)) as resp:
        assert resp.status == 200
    with pytest.raises(asyncio.TimeoutError):
        async with api.http.get("/cdn/f/n.big", timeout=aiohttp.ClientTimeout(total=0.05)):
            pass
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with api.http.get("/cdn/f/n.big") as resp:
        assert resp.status == 404
    assert loop.time() - started >= 0.3


async def test_a_gate_holds_matching_requests_until_it_opens(api: Api) -> None:
    assert await api.put_big("/cdn/f/n.big", BIG) == 201
    gate = api.emulator.hold("GET", "/cdn/f/")

    async def get(path: str) -> tuple[int, bytes]:
        async with api.http.get(path) as resp:
            return resp.status, await resp.read()

    held = [asyncio.ensure_future(get("/cdn/f/n.big")) for _ in range(3)]
    try:
        await wait_for(lambda: gate.held == 3, what="three requests at the gate")
        # Other paths and methods pass, and the held ones are still waiting.
        assert (await get("/cdn/g/n.big"))[0] == 404
        assert await api.put_big("/cdn/f/other.big", BIG) == 201
        assert not any(task.done() for task in held)
        assert api.emulator.requests("GET", "/cdn/f/n.big") == 3
    finally:
        gate.open()
    assert await asyncio.gather(*held) == [(200, BIG)] * 3
    assert await get("/cdn/f/n.big") == (200, BIG)  # an open gate lets the next one through
    assert gate.held == 4


async def test_truncating_a_range_answer(api: Api) -> None:
    api.emulator.add_rule(FaultRule("GET", "/cdn/", "truncate", truncate_at=0))
    assert await api.put_big("/cdn/f/n.big", BIG) == 201
    async with api.http.get("/cdn/f/n.big", headers={"Range": "bytes=10-"}) as resp:
        assert resp.status == 206
        assert await read_until_error(resp) == b""


# Bytes altered in transit

OFFSET = 1_000_003  # past the first 256 KiB chunk the emulator streams


async def test_a_flip_bit_rule_flips_one_bit_in_transit(api: Api) -> None:
    assert await api.put_big("/cdn/f/n.big", BIG) == 201
    api.emulator.add_rule(FaultRule("GET", "/cdn/", "flip-bit", count=None, offset=OFFSET))
    async with api.http.get("/cdn/f/n.big") as resp:
        assert resp.status == 200
        assert resp.content_length == len(BIG)
        assert await resp.read() == flipped(BIG, OFFSET)
    header = {"Range": f"bytes={OFFSET - 3}-{OFFSET + 96}"}
    async with api.http.get("/cdn/f/n.big", headers=header) as resp:
        assert resp.status == 206
        body = await resp.read()
    assert body == flipped(BIG[OFFSET - 3 : OFFSET + 97], 3)
    assert api.emulator.store.big_path("f", "n").read_bytes() == BIG


NEAR_THE_END = len(BIG) - 5


@pytest.mark.parametrize(
    ("header", "start", "stop"),
    [
        ("bytes=-32", len(BIG) - 32, len(BIG)),
        (f"bytes={len(BIG) - 300_000}-", len(BIG) - 300_000, len(BIG)),  # a resumed download
        (f"bytes={NEAR_THE_END}-{NEAR_THE_END}", NEAR_THE_END, NEAR_THE_END + 1),
        ("bytes=0-999", 0, 1000),
        (f"bytes=1000-{NEAR_THE_END - 1}", 1000, NEAR_THE_END),
    ],
)
async def test_a_flip_bit_rule_shows_where_a_range_covers_it(
    api: Api, header: str, start: int, stop: int
) -> None:
    assert await api.put_big("/cdn/f/n.big", BIG) == 201
    api.emulator.add_rule(FaultRule("GET", "/cdn/", "flip-bit", offset=NEAR_THE_END))
    async with api.http.get("/cdn/f/n.big", headers={"Range": header}) as resp:
        assert resp.status == 206
        assert resp.content_length == stop - start
        body = await resp.read()
    assert body == flipped(BIG, NEAR_THE_END)[start:stop]
    assert (body == BIG[start:stop]) == (not start <= NEAR_THE_END < stop)


async def test_a_flip_bit_rule_without_an_offset_flips_the_middle_byte(api: Api) -> None:
    assert await api.put_big("/cdn/f/n.big", BIG) == 201
    api.emulator.add_rule(FaultRule("GET", "/cdn/", "flip-bit"))
    async with api.http.get("/cdn/f/n.big") as resp:
        assert await resp.read() == flipped(BIG, len(BIG) // 2)


@pytest.mark.parametrize(
    ("size", "offset", "start"),
    [
        (len(BIG), OFFSET, OFFSET - OFFSET % 16),
        (len(BIG), None, len(BIG) // 2 - len(BIG) // 2 % 16),
        (len(BIG), len(BIG) - 1, len(BIG) - len(BIG) % 16 - 32),  # no next block
        (40, 30, 0),
        (32, None, 0),
        (31, 0, None),  # not two whole blocks: nothing to swap
    ],
)
async def test_a_swap_blocks_rule_swaps_two_blocks_in_transit(
    api: Api, size: int, offset: int | None, start: int | None
) -> None:
    data = BIG[:size]
    assert await api.put_big("/cdn/f/n.big", data) == 201
    api.emulator.add_rule(FaultRule("GET", "/cdn/", "swap-blocks", offset=offset))
    async with api.http.get("/cdn/f/n.big") as resp:
        assert resp.status == 200
        assert resp.content_length == size
        body = await resp.read()
    assert body == (data if start is None else swapped(data, start))
    assert len(body) == size
    assert api.emulator.store.big_path("f", "n").read_bytes() == data


@pytest.mark.parametrize("kind", ["flip-bit", "swap-blocks"])
async def test_a_tampering_rule_with_a_count_spares_later_gets(api: Api, kind: FaultKind) -> None:
    assert await api.put_big("/cdn/f/n.big", BIG) == 201
    api.emulator.add_rule(FaultRule("GET", "/cdn/", kind, count=1, offset=OFFSET))
    async with api.http.get("/cdn/f/n.big") as resp:
        assert await resp.read() != BIG
    async with api.http.get("/cdn/f/n.big") as resp:
        assert await resp.read() == BIG


async def test_a_tampering_rule_leaves_other_answers_alone(api: Api) -> None:
    api.emulator.add_rule(FaultRule(None, "/", "flip-bit", count=None, offset=0))
    assert await api.token()
    async with api.http.get("/cdn/f/none.big") as resp:
        assert resp.status == 404
        assert "detail" in await resp.json()


async def test_a_flip_bit_rule_can_be_added_over_http(api: Api) -> None:
    assert await api.put_big("/cdn/f/n.big", b"0123456789") == 201
    rule = {"method": "GET", "path_prefix": "/cdn/", "kind": "flip-bit", "offset": 3}
    async with api.http.post("/_emulator/faults", json={"rules": [rule]}) as resp:
        assert resp.status == 200
        assert (await resp.json())["rules"] == [
            {**rule, "status": 503, "count": 1, "delay": 0.0, "truncate_at": None, "remaining": 1}
        ]
    async with api.http.get("/cdn/f/n.big") as resp:
        assert await resp.read() == b"0122456789"


# A 422 that quotes the request


async def test_an_echo_rule_quotes_the_submitted_json(api: Api) -> None:
    api.emulator.add_rule(FaultRule("POST", "/login", "echo"))
    body = {"email": "a@b", "password": "hunter2-secret"}
    async with api.http.post("/login", json=body) as resp:
        assert resp.status == 422
        assert resp.content_type == "application/json"
        answer = await resp.json()
    assert answer == {
        "detail": [
            {
                "type": "value_error",
                "loc": ["body"],
                "msg": "Value error, rejected by the emulator",
                "input": body,
            }
        ]
    }
    assert answer["detail"][0]["input"]["password"] == "hunter2-secret"
    assert await api.token()  # the rule is spent


async def test_an_echo_rule_quotes_a_body_that_is_not_json(api: Api) -> None:
    api.emulator.add_rule(FaultRule("POST", "/login", "echo"))
    async with api.http.post("/login", data=b"password=hunter2-secret") as resp:
        assert resp.status == 422
        assert (await resp.json())["detail"][0]["input"] == "password=hunter2-secret"


# Random faults


async def test_random_faults_replay_with_the_same_seed(
    aiohttp_server: Callable[..., Any], tmp_path: Path
) -> None:
    async def statuses(seed: int) -> list[int]:
        config = EmulatorConfig(
            storage_dir=tmp_path / str(seed), rates=FaultRates(error_rate=0.5), seed=seed
        )
        server = await aiohttp_server(make_app(Emulator(config)))
        async with aiohttp.ClientSession(f"http://127.0.0.1:{server.port}") as http:
            found = []
            for _ in range(30):
                async with http.get("/cdn/f/n.big") as resp:
                    found.append(resp.status)
            return found

    first = await statuses(7)
    assert first == await statuses(7)
    assert set(first) == {404, 503}


@pytest.mark.parametrize(
    ("rates", "error"),
    [
        ({"drop_rate": 1.0}, aiohttp.ServerDisconnectedError),
        ({"truncate_rate": 1.0, "delay": 0.01}, aiohttp.ClientPayloadError),
    ],
)
async def test_random_faults_set_over_http(
    api: Api, rates: dict[str, float], error: type[Exception]
) -> None:
    assert await api.put_big("/cdn/f/n.big", b"0123456789") == 201
    async with api.http.post("/_emulator/faults", json=rates) as resp:
        assert resp.status == 200
    with pytest.raises(error):
        async with api.http.get("/cdn/f/n.big") as resp:
            await resp.read()
    async with api.http.get("/_emulator/health") as resp:
        assert resp.status == 200
    async with api.http.delete("/_emulator/faults") as resp:
        assert (await resp.json())["drop_rate"] == 0
    async with api.http.get("/cdn/f/n.big") as resp:
        assert await resp.read() == b"0123456789"


async def test_control_endpoints_never_get_faults(api: Api) -> None:
    api.emulator.set_rates(FaultRates(error_rate=1.0))
    api.emulator.add_rule(FaultRule(None, "/", "drop", count=None))
    for method, path in [("GET", "/_emulator/health"), ("GET", "/_emulator/stats")]:
        async with api.http.request(method, path) as resp:
            assert resp.status == 200
    with pytest.raises(aiohttp.ServerDisconnectedError):  # the rule fires before the rates
        async with api.http.get("/resources/key-fragment"):
            pass
    api.emulator.clear_faults()
    async with api.http.get("/resources/key-fragment") as resp:
        assert resp.status == 401


async def test_rules_can_be_added_over_http(api: Api) -> None:
    rule = {"method": "GET", "path_prefix": "/cdn/", "kind": "status", "status": 500}
    async with api.http.post("/_emulator/faults", json={"rules": [rule, rule]}) as resp:
        assert resp.status == 200
        assert [r["remaining"] for r in (await resp.json())["rules"]] == [1, 1]
    for _ in range(2):
        async with api.http.get("/cdn/f/n.big") as resp:
            assert resp.status == 500
    async with api.http.get("/cdn/f/n.big") as resp:
        assert resp.status == 404


@pytest.mark.parametrize(
    "body",
    [
        {"rules": [{"path_prefix": "/", "kind": "explode"}]},
        {"rules": [{"path_prefix": "/", "kind": "drop", "colour": "red"}]},
        {"rules": [{"path_prefix": "/", "kind": "drop", "count": 0}]},
        {"rules": [{"path_prefix": "/", "kind": "flip-bit", "offset": -1}]},
        {"rules": [{"path_prefix": "/", "kind": "swap-blocks", "offset": True}]},
        {"rules": [{"kind": "drop"}]},
        {"rules": {"kind": "drop"}},
        {"error_rate": 0.6, "drop_rate": 0.6},
        {"delay": -1},
        {"error_rate": "often"},
        {"seed": "x"},
        {"mood": "grumpy"},
        [],
    ],
)
async def test_bad_fault_settings_are_422_and_change_nothing(api: Api, body: object) -> None:
    async with api.http.post("/_emulator/faults", json=body) as resp:
        assert resp.status == 422
    async with api.http.get("/_emulator/faults") as resp:
        settings = await resp.json()
    assert settings["rules"] == []
    assert settings["error_rate"] == settings["drop_rate"] == settings["delay"] == 0


# Stats and health


async def test_stats_count_requests_logins_and_downloads(api: Api) -> None:
    assert await api.put_big("/cdn/f/n.big", b"0123456789") == 201  # one login
    api.emulator.add_rule(FaultRule("GET", "/cdn/", "status"))
    api.emulator.add_rule(FaultRule("GET", "/cdn/", "truncate", truncate_at=4))
    api.emulator.add_rule(FaultRule("POST", "/resources/get/", "drop"))
    async with api.http.get("/cdn/f/n.big") as resp:
        assert resp.status == 503
    async with api.http.get("/cdn/f/n.big") as resp:
        await read_until_error(resp)
    for _ in range(2):
        async with api.http.get("/cdn/f/n.big") as resp:
            await resp.read()
    with pytest.raises(aiohttp.ServerDisconnectedError):
        async with api.http.post("/resources/get/f", json={"fileName": "n.small"}):
            pass
    async with api.http.post("/login", json={"email": USER, "password": "no"}):
        pass
    async with api.http.get("/_emulator/stats") as resp:
        stats = await resp.json()
    assert stats == {
        "requests": {
            "POST /login": 2,
            "PUT /cdn/f/n.big": 1,
            "GET /cdn/f/n.big": 4,
            "POST /resources/get/f": 1,
        },
        "logins": 1,
        "failed_logins": 1,
        "bytes_served": {"/cdn/f/n.big": 24},
        "downloads": {"/cdn/f/n.big": 2},
    }
    assert api.emulator.stats() == stats
    async with api.http.delete("/_emulator/stats") as resp:
        assert (await resp.json())["requests"] == {}


async def test_health(api: Api) -> None:
    async with api.http.get("/_emulator/health") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}


async def test_unknown_routes_answer_json(api: Api) -> None:
    async with api.http.get("/nowhere") as resp:
        assert resp.status == 404
        assert "detail" in await resp.json()
    async with api.http.delete("/login") as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "POST"


# Robustness and secrets


async def test_an_upload_cut_off_by_the_client_leaves_nothing(
    api: Api, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = URL(api.url)
    token = await api.token()
    _, writer = await asyncio.open_connection(url.host, url.port)
    writer.write(
        f"PUT /cdn/f/cut.big HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        "Content-Length: 1000\r\n\r\n0123456789".encode()
    )
    await writer.drain()
    incoming = tmp_path / "parts" / "incoming"
    await wait_for(lambda: incoming.is_dir() and any(incoming.iterdir()), DEADLINE, "a part upload")
    writer.close()
    await writer.wait_closed()
    await wait_for(lambda: not any(incoming.iterdir()), DEADLINE, "the partial file to go")
    async with api.http.get("/cdn/f/cut.big") as resp:
        assert resp.status == 404
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_download_abandoned_half_way_is_counted_as_such(api: Api) -> None:
    big = bytes(16 * 1024 * 1024)  # more than loopback socket buffers hold
    assert await api.put_big("/cdn/f/n.big", big) == 201
    async with api.http.get("/cdn/f/n.big") as resp:
        await resp.content.readexactly(1000)
        resp.close()
    await wait_for(
        lambda: "/cdn/f/n.big" in api.emulator.stats()["bytes_served"], DEADLINE, "the download"
    )
    assert 1000 <= api.emulator.stats()["bytes_served"]["/cdn/f/n.big"] < len(big)
    assert api.emulator.stats()["downloads"] == {}


async def test_a_malformed_multipart_body_is_422(api: Api) -> None:
    headers = {**await api.auth(), "Content-Type": "multipart/form-data; boundary=zz"}
    async with api.http.post("/resources/f", data=b"garbage", headers=headers) as resp:
        assert resp.status == 422


async def test_no_secret_reaches_the_logs(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    headers = await api.auth()
    for path in ("/binary-split/key-fragment", "/resources/key-fragment"):
        async with api.http.get(path, headers=headers) as resp:
            await resp.read()
    text = caplog.text + repr(api.emulator.config)
    for secret in (
        PASSWORD,
        headers["Authorization"][7:],
        ARCHIVE[:20].decode(),
        RESOURCE[:20].decode(),
    ):
        assert secret not in text


# The command line


async def test_the_command_line_serves_until_sigterm(tmp_path: Path) -> None:
    fragment_file = tmp_path / "resource.bin"
    fragment_file.write_bytes(RESOURCE)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.emulator",
        "--port",
        "0",
        "--user",
        f"{USER}:{PASSWORD}",
        "--archive-fragment-hex",
        ARCHIVE.hex(),
        "--resource-fragment-file",
        str(fragment_file),
        "--token-ttl",
        "3600",
        "--fault",
        '{"method": "GET", "path_prefix": "/cdn/", "kind": "status", "status": 502}',
        "--verbose",
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(scratch)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), DEADLINE)).decode()
        prefix = "emulator listening on http://127.0.0.1:"
        assert line.startswith(prefix)
        assert line.endswith("\n")
        port = int(line[len(prefix) :])
        assert port > 0
        assert any(scratch.iterdir())  # the default storage
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            async with http.get("/_emulator/health") as resp:
                assert await resp.json() == {"status": "ok"}
            headers = {"Authorization": f"Bearer {await log_in(http)}"}
            for path, fragment in (
                ("/binary-split/key-fragment", ARCHIVE),
                ("/resources/key-fragment", RESOURCE),
            ):
                async with http.get(path, headers=headers) as resp:
                    assert await resp.read() == fragment
            async with http.get("/cdn/f/n.big") as resp:
                assert resp.status == 502
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), DEADLINE)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    assert stdout == b""  # the one line, and nothing after it
    assert b"GET /_emulator/health" in stderr  # --verbose logs requests
    assert b"Traceback" not in stderr
    for secret in (PASSWORD.encode(), ARCHIVE[:20], RESOURCE[:20]):
        assert secret not in stderr
    assert not any(scratch.iterdir())  # the default storage is gone


@pytest.mark.parametrize(
    "args",
    [
        ["--user", "no-colon"],
        ["--archive-fragment-hex", "zz"],
        ["--resource-fragment-file", "/nonexistent/file"],
        ["--error-rate", "2"],
        ["--token-ttl", "-1"],
        ["--fault", '{"kind": "drop"}'],
        ["--fault", '{"path_prefix": "/cdn/", "kind": "flip-bit", "offset": -1}'],
        ["--archive-fragment-hex", "00", "--archive-fragment-file", "/dev/null"],
    ],
)
async def test_the_command_line_refuses_bad_arguments(args: list[str]) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.emulator",
        "--port",
        "0",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), DEADLINE)
    assert proc.returncode == 2
    assert stdout == b""
    assert b"usage:" in stderr
