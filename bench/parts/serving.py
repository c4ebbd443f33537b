"""Rows 8, 10 and 11: /health under load, cold start by socket activation, idle memory."""

from __future__ import annotations

import json
import os
import shutil
import sys

from bench.fixtures import Bench, daemon_env, loader_argv
from bench.harness import Spread, percentile, rss_mb, timed_first_answer
from bench.results import PartResult, Row, runs

CONCURRENCY = 50
REQUESTS = 20_000
WARMUP = 2_000
COLD_START_RUNS = 5


def _pinning() -> tuple[int | None, int | None]:
    """(daemon's CPU, client's CPU): apart when there are two CPUs and taskset."""
    if (os.cpu_count() or 1) >= 2 and shutil.which("taskset"):
        return 0, 1
    return None, None


def health_burst(bench: Bench) -> PartResult:
    """Row 8: GET /health at concurrency 50 from an aiohttp client in its own process."""
    daemon_cpu, client_cpu = _pinning()
    daemon = bench.daemon(cpu=daemon_cpu, log_level="info")
    rates, p50s, p99s = [], [], []
    try:
        for _ in range(bench.runs):
            bench.settle()
            burst = bench.spawn(
                "burst",
                [
                    sys.executable,
                    "-m",
                    "bench.loadgen",
                    "burst",
                    f"--socket={daemon.socket}",
                    f"--concurrency={CONCURRENCY}",
                    f"--requests={REQUESTS}",
                    f"--warmup={WARMUP}",
                ],
                cpu=client_cpu,
            )
            burst.wait(600)
            result = json.loads(burst.wait_line("{", 5))
            latencies = [s * 1000 for s in result["latencies"]]
            rates.append(result["requests"] / result["seconds"])
            p50s.append(percentile(latencies, 50))
            p99s.append(percentile(latencies, 99))
            print(f"  /health x{CONCURRENCY}: {rates[-1]:,.0f}/s, p99 {p99s[-1]:.2f} ms")
        after = daemon.rss_mb()
    finally:
        daemon.stop()
    rate, p50, p99 = Spread.of(rates), Spread.of(p50s), Spread.of(p99s)
    pinned = (
        f"daemon pinned to CPU {daemon_cpu}, client to CPU {client_cpu} (taskset)"
        if daemon_cpu is not None
        else "not pinned"
    )
    result_part = PartResult()
    result_part.rows += [
        Row(
            "8",
            f"GET /health at concurrency {CONCURRENCY}: requests/s",
            rate.fmt("/s", 0),
            target=">= 8,000/s",
            met=rate.median >= 8000,
            runs=f"{runs(rate, 0)} /s",
        ),
        Row(
            "8b",
            f"GET /health at concurrency {CONCURRENCY}: p50; p99",
            f"{p50.fmt('ms', 2)}; {p99.fmt('ms', 2)}",
            target="p99 < 10 ms",
            met=p99.median < 10,
            runs=f"p50 {runs(p50, 2)} ms; p99 {runs(p99, 2)} ms",
        ),
    ]
    result_part.notes.append(
        f"Row 8: {REQUESTS:,} requests after {WARMUP:,} of warm-up per run, "
        f"ClientSession(UnixConnector(limit={CONCURRENCY})) in a process of its own, one daemon "
        f"with LOG_LEVEL=info (no access log), {pinned}. The aiohttp client itself saturates "
        f"near 14k/s on such a machine, so this is a floor of what the daemon can do. Its RSS "
        f"after all runs: {after:.1f} MB."
    )
    return result_part


def cold_start(bench: Bench) -> PartResult:
    """Row 10: systemd-socket-activate, then connect() to the first complete /health answer."""
    sock = bench.work / "activated.sock"
    command = ["systemd-socket-activate", "-l", str(sock)]
    command += ["-E", f"MODEL_CACHE_DIR={bench.models}", "-E", "LOG_LEVEL=info"]
    command += ["-E", f"MALLOC_ARENA_MAX={daemon_env()['MALLOC_ARENA_MAX']}"]
    # systemd-socket-activate passes on only what -E names: a PYTHONPATH that picks the
    # tree to measure (a worktree beside the venv's own) must go along.
    if os.environ.get("PYTHONPATH"):
        command += ["-E", f"PYTHONPATH={os.environ['PYTHONPATH']}"]
    command += loader_argv()
    count = max(bench.runs, COLD_START_RUNS)
    times, rss = [], []
    for index in range(count + 1):
        sock.unlink(missing_ok=True)
        bench.settle()
        child = bench.spawn("socket-activate", command)
        try:
            child.wait_line("Listening on", 10, stderr=True)
            seconds = timed_first_answer(sock, "/health")
            memory = rss_mb(child.pid)
        finally:
            child.stop()
            sock.unlink(missing_ok=True)
        if index == 0:
            continue  # untimed: fills the page cache with the interpreter and the modules
        times.append(seconds * 1000)
        rss.append(memory)
        print(f"  cold start: {times[-1]:.0f} ms")
    took, memory_at = Spread.of(times), Spread.of(rss)
    result = PartResult()
    result.rows.append(
        Row(
            "10",
            "cold start by socket activation: first connect() to a complete /health",
            took.fmt("ms", 0),
            target="< 250 ms",
            met=took.median < 250,
            runs=f"{runs(took, 0)} ms; RSS at that answer {runs(memory_at)} MB",
        )
    )
    result.notes.append(
        f"Row 10: `systemd-socket-activate -l SOCK -E ... {' '.join(loader_argv())}`; the "
        "clock starts at the client's connect(), which makes systemd-socket-activate exec the "
        "daemon, and stops when the whole answer is read. One untimed run first (page cache). "
        f"RSS at the first answer: {memory_at.fmt('MB')}."
    )
    return result


def idle_rss(bench: Bench) -> PartResult:
    """Row 11: a fresh daemon's RSS once it has answered its first /health."""
    values = []
    for _ in range(bench.runs):
        daemon = bench.daemon()
        try:
            values.append(daemon.rss_mb())
        finally:
            daemon.stop()
    rss = Spread.of(values)
    result = PartResult()
    result.rows.append(
        Row(
            "11",
            "idle daemon RSS after start and one /health",
            rss.fmt("MB"),
            target="< 45 MB",
            met=rss.hi < 45,
            runs=f"{runs(rss)} MB",
        )
    )
    return result
