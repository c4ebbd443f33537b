"""GET /health load generators, run as their own process (so that the bench's own threads
do not share their interpreter), each printing one JSON line of results:

    python -m bench.loadgen burst --socket S --concurrency 50 --requests 20000 --warmup 2000
    python -m bench.loadgen probe --socket S --interval 0.01   # until its stdin closes

`probe` prints "probing" once its first request succeeded; its results are pairs of
(time.monotonic() when the request started, latency), both in seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import threading
import time
from pathlib import Path

import aiohttp

URL = "http://loader/health"


def _session(socket: Path, limit: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket), limit=limit))


async def _get(http: aiohttp.ClientSession) -> float:
    """One GET /health, read whole; its latency in seconds."""
    started = time.perf_counter()
    async with http.get(URL) as resp:
        await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"/health answered {resp.status}")
    return time.perf_counter() - started


async def _many(http: aiohttp.ClientSession, concurrency: int, total: int) -> list[float]:
    latencies: list[float] = []
    left = total

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            latencies.append(await _get(http))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


async def burst(
    socket: Path, concurrency: int, requests: int, warmup: int
) -> dict[str, float | list[float]]:
    async with _session(socket, concurrency) as http:
        await _many(http, concurrency, warmup)
        started = time.perf_counter()
        latencies = await _many(http, concurrency, requests)
        seconds = time.perf_counter() - started
    return {"requests": len(latencies), "seconds": seconds, "latencies": latencies}


async def probe(socket: Path, interval: float) -> list[tuple[float, float]]:
    """Sequential GETs every `interval` s (at once when one took longer) until stdin closes."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def wait_eof() -> None:
        sys.stdin.buffer.read()
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=wait_eof, daemon=True).start()
    samples: list[tuple[float, float]] = []
    async with _session(socket, 1) as http:
        await _get(http)
        print("probing", flush=True)
        next_at = time.perf_counter()
        while not stop.is_set():
            samples.append((time.monotonic(), await _get(http)))
            next_at = max(next_at + interval, time.perf_counter())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, next_at - time.perf_counter()))
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("burst")
    one.add_argument("--socket", type=Path, required=True)
    one.add_argument("--concurrency", type=int, default=50)
    one.add_argument("--requests", type=int, default=20_000)
    one.add_argument("--warmup", type=int, default=2_000)
    other = commands.add_parser("probe")
    other.add_argument("--socket", type=Path, required=True)
    other.add_argument("--interval", type=float, default=0.01)
    args = parser.parse_args(argv)
    if args.command == "burst":
        result = asyncio.run(burst(args.socket, args.concurrency, args.requests, args.warmup))
        print(json.dumps(result), flush=True)
    else:
        print(json.dumps({"samples": asyncio.run(probe(args.socket, args.interval))}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
