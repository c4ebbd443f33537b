"""Soak the daemon: a mixed load for a while against the emulator with random faults on.

    python bench/soak.py --minutes 10 [--concurrency 8] [--seed 1] [--keep]

It starts the emulator (`--error-rate 0.05 --drop-rate 0.02 --truncate-rate 0.02 --seed 1`
by default) and `azaion-loader serve` as processes in a scratch folder, logs in, uploads a
few resources, then runs workers that call /health, /status, /unlock/status (polling), /load
(a share of them with the cache entry evicted, so that the CDN's faults bite) and now and
then /unlock (no Docker and no archive here: a clear 503 is its expected answer). Every
loaded body is compared with what was uploaded. At the end: requests served, answers by
kind, the daemon's RSS at start and end, and its log's warnings and tracebacks.
Exit status 1 if the daemon died, answered a 500, served a wrong body or leaked a partial
file; 0 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
EMAIL = "soak@azaion.test"
PASSWORD = "soak-password-123"
FOLDER = "soak"
SIZES = (0, 1_000, 40_000, 300_000, 1_000_000, 4_000_000)
# Operation weights: mostly cheap calls, as the stack's services make them.
OPERATIONS = {"health": 30, "status": 15, "unlock-status": 20, "load": 30, "unlock": 5}
REQUEST_TIMEOUT = 60.0
_LISTENING = re.compile(r"emulator listening on (http://\S+)")


@dataclass
class Tally:
    started: float = field(default_factory=time.monotonic)
    calls: collections.Counter[str] = field(default_factory=collections.Counter)
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    bytes_loaded: int = 0
    rss_max: int = 0

    def record(self, operation: str, outcome: str) -> None:
        self.calls[operation] += 1
        self.outcomes[f"{operation}: {outcome}"] += 1


@dataclass
class Processes:
    scratch: Path
    emulator: asyncio.subprocess.Process
    daemon: asyncio.subprocess.Process
    url: str
    socket: Path
    cache: Path
    log: Path


def rss_kib(pid: int) -> int:
    """The resident set of `pid`, in KiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


async def start_emulator(scratch: Path, args: argparse.Namespace) -> tuple[Any, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.emulator",
        "--port",
        "0",
        "--user",
        f"{EMAIL}:{PASSWORD}",
        "--storage",
        str(scratch / "emulator"),
        "--error-rate",
        str(args.error_rate),
        "--drop-rate",
        str(args.drop_rate),
        "--truncate-rate",
        str(args.truncate_rate),
        "--seed",
        str(args.seed),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        stdin=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    match = _LISTENING.search(line.decode())
    if match is None:
        raise SystemExit(f"the emulator did not start: {line!r}")
    return proc, match.group(1)


async def start_daemon(scratch: Path, url: str) -> tuple[Any, Path, Path, Path]:
    socket_path = scratch / "loader.sock"
    cache = scratch / "models"
    log = scratch / "daemon.log"
    tmp = scratch / "tmp"
    tmp.mkdir()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))},
        "RESOURCE_API_URL": url,
        "CDN_URL": f"{url}/cdn",
        "LOADER_SOCKET": str(socket_path),
        "MODEL_CACHE_DIR": str(cache),
        "IMAGES_PATH": str(scratch / "no-archive.enc"),
        "DOCKER_HOST": f"unix://{scratch}/no-docker.sock",
        "CONNECT_TIMEOUT": "2",
        "API_TIMEOUT": "5",
        "READ_TIMEOUT": "10",
        "API_RETRIES": "3",
        "LOG_LEVEL": "info",
        "TMPDIR": str(tmp),
        "PYTHONUNBUFFERED": "1",
    }
    stderr = log.open("wb")  # the child keeps its own copy
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "loader",
            "serve",
            cwd=ROOT,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
        )
    finally:
        stderr.close()
    deadline = time.monotonic() + 30
    while not socket_path.exists():
        if proc.returncode is not None or time.monotonic() > deadline:
            raise SystemExit(f"the daemon did not start:\n{log.read_text()}")
        await asyncio.sleep(0.05)
    return proc, socket_path, cache, log


def outcome_of(status: int, body: bytes) -> str:
    if status < 400:
        return f"{status}"
    try:
        code = json.loads(body).get("code", "?")
    except (ValueError, AttributeError):
        code = "not-json"
    return f"{status} {code}"


async def call(
    session: aiohttp.ClientSession, method: str, path: str, **kwargs: Any
) -> tuple[int, bytes]:
    async with session.request(method, "http://loader" + path, **kwargs) as resp:
        return resp.status, await resp.read()


async def until_ok(what: str, attempt: Callable[[], Awaitable[tuple[int, bytes]]]) -> None:
    """Repeat a setup call through the random faults until it succeeds."""
    for _ in range(50):
        try:
            status, body = await attempt()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            print(f"  {what}: {type(exc).__name__}, again")
            continue
        if status == 200:
            return
        print(f"  {what}: {outcome_of(status, body)}, again")
    raise SystemExit(f"{what} never succeeded")


async def upload(session: aiohttp.ClientSession, name: str, data: bytes) -> tuple[int, bytes]:
    form = aiohttp.FormData()
    form.add_field("folder", FOLDER)
    form.add_field("data", data, filename="model.bin", content_type="application/octet-stream")
    return await call(session, "POST", f"/upload/{name}", data=form)


async def one_operation(
    operation: str,
    session: aiohttp.ClientSession,
    resources: dict[str, bytes],
    cache: Path,
    rng: random.Random,
    tally: Tally,
) -> None:
    if operation == "health":
        status, body = await call(session, "GET", "/health")
    elif operation == "status":
        status, body = await call(session, "GET", "/status")
    elif operation == "unlock-status":
        status, body = await call(session, "GET", "/unlock/status")
    elif operation == "unlock":
        status, body = await call(
            session, "POST", "/unlock", json={"email": EMAIL, "password": PASSWORD}
        )
    else:
        name = rng.choice(sorted(resources))
        if rng.random() < 0.3:  # evicted: this load goes to the CDN
            with contextlib.suppress(FileNotFoundError):
                (cache / FOLDER / f"{name}.big").unlink()
        async with session.post(
            f"http://loader/load/{name}", json={"filename": name, "folder": FOLDER}
        ) as resp:
            status = resp.status
            try:
                body = await resp.read()
            except aiohttp.ClientPayloadError:
                tally.record(operation, "cut stream")
                return
        if status == 200:
            tally.bytes_loaded += len(body)
            if body != resources[name]:
                tally.record(operation, "WRONG BODY")
                return
    tally.record(operation, outcome_of(status, body))


async def worker(
    socket: Path,
    resources: dict[str, bytes],
    cache: Path,
    until: float,
    seed: int,
    tally: Tally,
) -> None:
    rng = random.Random(seed)
    names, weights = zip(*OPERATIONS.items(), strict=True)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    async with aiohttp.ClientSession(
        connector=aiohttp.UnixConnector(path=str(socket)), timeout=timeout
    ) as session:
        while time.monotonic() < until:
            operation = rng.choices(names, weights)[0]
            try:
                await one_operation(operation, session, resources, cache, rng, tally)
            except asyncio.TimeoutError:
                tally.record(operation, f"no answer within {REQUEST_TIMEOUT:.0f} s")
            except aiohttp.ClientError as exc:
                tally.record(operation, f"connection error: {type(exc).__name__}")


async def sample_rss(pid: int, until: float, tally: Tally) -> None:
    while time.monotonic() < until:
        tally.rss_max = max(tally.rss_max, rss_kib(pid))
        await asyncio.sleep(1)


async def soak(args: argparse.Namespace, scratch: Path) -> int:
    emulator, url = await start_emulator(scratch, args)
    daemon = None
    try:
        daemon, socket, cache, log = await start_daemon(scratch, url)
        rng = random.Random(args.seed)
        resources = {f"model-{i}.bin": rng.randbytes(size) for i, size in enumerate(SIZES)}
        async with aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(socket)),
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
        ) as session:
            print("setting up: login and uploads, through the faults")
            await until_ok(
                "login",
                lambda: call(
                    session, "POST", "/login", json={"email": EMAIL, "password": PASSWORD}
                ),
            )
            for name, data in resources.items():
                await until_ok(f"upload {name}", functools.partial(upload, session, name, data))
        # A warm-up with the same load first: RSS growth should show leaks, not the first use
        # of code that loads lazily (the Docker SDK at the first /unlock) or pools filling up.
        rss_setup = rss_kib(daemon.pid)
        warm_until = time.monotonic() + args.warmup
        await asyncio.gather(
            *(
                worker(socket, resources, cache, warm_until, args.seed * 1000 + i, Tally())
                for i in range(args.concurrency)
            )
        )
        print(
            f"warmed up for {args.warmup:g} s: RSS {rss_setup / 1024:.1f} MiB after setup, "
            f"{rss_kib(daemon.pid) / 1024:.1f} MiB now"
        )
        tally = Tally()
        rss_start = rss_kib(daemon.pid)
        until = time.monotonic() + args.minutes * 60
        print(
            f"soaking for {args.minutes:g} min: {args.concurrency} workers, "
            f"daemon pid {daemon.pid}, RSS {rss_start / 1024:.1f} MiB"
        )
        await asyncio.gather(
            sample_rss(daemon.pid, until, tally),
            *(
                worker(socket, resources, cache, until, args.seed * 1000 + i, tally)
                for i in range(args.concurrency)
            ),
        )
        elapsed = time.monotonic() - tally.started
        rss_end = rss_kib(daemon.pid)
        alive = daemon.returncode is None
        partials = [str(p) for p in cache.rglob("*.part")]
        if alive:
            daemon.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(daemon.wait(), 60)
        text = log.read_text(errors="replace")
        leftovers = [str(p) for p in cache.rglob("*.part")] + [
            str(p) for p in (scratch / "tmp").iterdir()
        ]
        report(args, tally, elapsed, rss_start, rss_end, alive, code, text, partials, leftovers)
        bad = (
            not alive
            or code != 0
            or any(k.endswith(("500 internal-error", "WRONG BODY")) for k in tally.outcomes)
            or "Traceback" in text
            or bool(leftovers)
        )
        return 1 if bad else 0
    finally:
        for proc in (daemon, emulator):
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()


def report(
    args: argparse.Namespace,
    tally: Tally,
    elapsed: float,
    rss_start: int,
    rss_end: int,
    alive: bool,
    code: int,
    log: str,
    partials: list[str],
    leftovers: list[str],
) -> None:
    total = sum(tally.calls.values())
    ok = sum(n for k, n in tally.outcomes.items() if k.split(": ", 1)[1] in ("200",))
    print(f"\n== soak: {elapsed / 60:.1f} min, faults {fault_flags(args)}")
    print(f"requests answered: {total} ({total / elapsed:.0f}/s), 200: {ok}")
    print(f"loaded: {tally.bytes_loaded / 1e6:.0f} MB of plaintext, every body checked")
    print("by operation: " + ", ".join(f"{k} {n}" for k, n in sorted(tally.calls.items())))
    print("answers other than 200, by kind:")
    for kind, count in sorted(tally.outcomes.items(), key=lambda kv: -kv[1]):
        if kind.split(": ", 1)[1] != "200":
            print(f"  {count:7d}  {kind}")
    print(
        f"daemon RSS: start {rss_start / 1024:.1f} MiB, end {rss_end / 1024:.1f} MiB, "
        f"max {tally.rss_max / 1024:.1f} MiB"
    )
    levels = collections.Counter(line[:3] for line in log.splitlines() if line.startswith("<"))
    print(
        f"daemon log: {levels.get('<3>', 0)} errors, {levels.get('<4>', 0)} warnings, "
        f"{log.count('Traceback')} tracebacks"
    )
    print(f"daemon alive at the end: {alive}; exit status after SIGTERM: {code}")
    print(f"partial cache files mid-run (downloads in flight): {len(partials)}")
    print(f"left behind after the stop: {leftovers or 'nothing'}")


def fault_flags(args: argparse.Namespace) -> str:
    return (
        f"--error-rate {args.error_rate} --drop-rate {args.drop_rate} "
        f"--truncate-rate {args.truncate_rate} --seed {args.seed}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--warmup", type=float, default=60.0, help="seconds of load before RSS is first read"
    )
    parser.add_argument("--error-rate", type=float, default=0.05)
    parser.add_argument("--drop-rate", type=float, default=0.02)
    parser.add_argument("--truncate-rate", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder and logs")
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="azl-soak-", dir="/tmp"))
    try:
        return asyncio.run(soak(args, scratch))
    finally:
        if args.keep:
            print(f"scratch folder kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
