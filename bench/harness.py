"""Processes, probes of /proc, samplers and statistics: what every part of the bench uses.

Nothing here knows about the loader's API beyond GET /health.
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")

MB = 1_000_000
DASH = "\u2013"  # between the smallest and the largest run
REPO = Path(__file__).resolve().parents[1]
_O_ACCMODE = 0o3


class BenchError(RuntimeError):
    """Something the bench needs did not happen (a process died, an answer was wrong)."""


# Statistics


@dataclass(frozen=True)
class Spread:
    """Several runs of one figure: the median and the range."""

    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("no runs")
        return cls(tuple(values))

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def lo(self) -> float:
        return min(self.values)

    @property
    def hi(self) -> float:
        return max(self.values)

    def fmt(self, unit: str = "", digits: int = 1) -> str:
        """'8.1 s (7.6 DASH 8.9, n=5)'."""
        sep = " " if unit and unit[0].isalnum() else ""
        return (
            f"{self.median:,.{digits}f}{sep}{unit} "
            f"({self.lo:,.{digits}f}{DASH}{self.hi:,.{digits}f}, n={len(self.values)})"
        )


def percentile(values: Sequence[float], pct: float) -> float:
    """The nearest-rank percentile (p99 of 20,000 is the 19,800th smallest)."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


# /proc


def _cpu_times() -> tuple[int, int]:
    """(idle + iowait, total) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    return fields[3] + fields[4], sum(fields[:8])


def wait_quiet(
    idle: float = 0.85, window: float = 0.5, windows: int = 3, timeout: float = 30.0
) -> bool:
    """Wait until the CPUs were at least `idle` idle for `windows` windows in a row (other
    work shares the machine); False if that did not happen within `timeout` s."""
    deadline = time.monotonic() + timeout
    calm = 0
    before = _cpu_times()
    while calm < windows:
        if time.monotonic() >= deadline:
            return False
        time.sleep(window)  # a measuring window, not a wait for an event
        after = _cpu_times()
        spent = after[1] - before[1]
        calm = calm + 1 if spent and (after[0] - before[0]) / spent >= idle else 0
        before = after
    return True


def proc_status(pid: int) -> dict[str, int]:
    """The kB figures of /proc/PID/status (VmRSS, VmHWM, ...)."""
    figures: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                figures[key] = int(parts[0])
    return figures


def rss_mb(pid: int) -> float:
    """Resident set size now, in MB (the kernel's kB / 1000, as the project reports it)."""
    return proc_status(pid)["VmRSS"] / 1000


def peak_rss_mb(pid: int) -> float:
    """The high-water mark of the resident set (VmHWM) since the process started."""
    return proc_status(pid)["VmHWM"] / 1000


def io_counters(pid: int) -> dict[str, int]:
    """/proc/PID/io: write_bytes is what the process caused to be written to storage."""
    with open(f"/proc/{pid}/io") as io:
        return {key: int(value) for key, value in (line.split(":") for line in io)}


def files_open_for_writing(pid: int) -> list[str]:
    """Regular files the process holds open for writing (from /proc/PID/fd and fdinfo)."""
    found = []
    fds = Path(f"/proc/{pid}/fd")
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if not target.startswith("/") or target.startswith(("/dev/", "/proc/")):
                continue
            flags = 0
            for line in Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().splitlines():
                if line.startswith("flags:"):
                    flags = int(line.split()[1], 8)
            if flags & _O_ACCMODE in (os.O_WRONLY, os.O_RDWR):
                found.append(target)
    return found


# Disk


def tree_bytes(root: Path, exclude: Path | None = None) -> int:
    """Bytes allocated under `root` (st_blocks), not following links nor crossing mounts,
    leaving out the folder `exclude`."""
    total = 0
    try:
        device = root.lstat().st_dev
    except OSError:
        return 0
    stack = [str(root)]
    while stack:
        with contextlib.suppress(OSError), os.scandir(stack.pop()) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    info = entry.stat(follow_symlinks=False)
                    if info.st_dev != device:
                        continue
                    total += info.st_blocks * 512
                    if entry.is_dir(follow_symlinks=False) and entry.path != str(exclude):
                        stack.append(entry.path)
    return total


def fs_used(path: Path) -> int:
    """Bytes in use on the filesystem holding `path` (statvfs: total - free)."""
    stats = os.statvfs(path)
    return (stats.f_blocks - stats.f_bfree) * stats.f_frsize


def warm(*paths: Path) -> None:
    """Read files once so that timed runs start from a warm page cache."""
    for path in paths:
        with open(path, "rb", buffering=0) as file:
            while file.read(8 << 20):
                pass


# Sampling


class Sampler(Generic[T]):
    """Calls `probe` every `interval` s in a thread; keeps (perf_counter, value) pairs.

    Stops by itself when the probe raises OSError (the process it watches is gone).
    """

    def __init__(self, probe: Callable[[], T], interval: float) -> None:
        self._probe = probe
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.samples: list[tuple[float, T]] = []

    def _run(self) -> None:
        next_at = time.perf_counter()
        while not self._stop.is_set():
            try:
                value = self._probe()
            except OSError:
                return
            self.samples.append((time.perf_counter(), value))
            next_at += self._interval
            self._stop.wait(max(0.0, next_at - time.perf_counter()))

    def __enter__(self) -> Sampler[T]:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def values(self) -> list[T]:
        return [value for _, value in self.samples]


# Processes


def _wrap(argv: Sequence[str], cpu: int | None) -> list[str]:
    """`argv`, dying with the bench (setpriv --pdeathsig), pinned to `cpu` (taskset)."""
    prefix: list[str] = []
    if shutil.which("setpriv"):
        prefix += ["setpriv", "--pdeathsig", "TERM"]
    if cpu is not None and shutil.which("taskset"):
        prefix += ["taskset", "-c", str(cpu)]
    return [*prefix, *argv]


class Child:
    """A subprocess whose stdout and stderr lines are kept (the last 500 of each).

    Wrapped in setpriv/taskset, which exec the command: the pid is the command's own.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cpu: int | None = None,
        stdin: bool = False,
        cwd: Path = REPO,
    ) -> None:
        self.name = name
        self.stdout: collections.deque[str] = collections.deque(maxlen=500)
        self.stderr: collections.deque[str] = collections.deque(maxlen=500)
        self._lines = threading.Condition()
        self.proc = subprocess.Popen(
            _wrap(argv, cpu),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            close_fds=True,
        )
        self._drains = [
            threading.Thread(target=self._drain, args=(stream, lines), daemon=True)
            for stream, lines in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr))
        ]
        for thread in self._drains:
            thread.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def _drain(self, stream: object, lines: collections.deque[str]) -> None:
        assert stream is not None
        for raw in stream:  # type: ignore[attr-defined]
            with self._lines:
                lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._lines.notify_all()
        with self._lines:
            self._lines.notify_all()

    def wait_line(self, prefix: str, timeout: float, *, stderr: bool = False) -> str:
        """The first kept line starting with `prefix`, waiting for it; BenchError if none."""
        lines = self.stderr if stderr else self.stdout
        deadline = time.monotonic() + timeout
        with self._lines:
            while True:
                for line in lines:
                    if line.startswith(prefix):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or (not self.running and not any(t.is_alive() for t in self._drains)):
                    break
                self._lines.wait(min(left, 0.1))
        raise BenchError(f"{self.name} did not print {prefix!r} in {timeout} s\n{self.tail()}")

    def close_stdin(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{self.name} did not exit in {timeout} s") from None
        for thread in self._drains:
            thread.join(5)
        return code

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL after `timeout` s; the exit status."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.close_stdin()
        for thread in self._drains:
            thread.join(5)
        return self.proc.returncode

    def tail(self, lines: int = 20) -> str:
        kept = [*self.stdout, *self.stderr][-lines:]
        return "\n".join(f"  {self.name}| {line}" for line in kept)


# HTTP over the Unix socket, without a client library (readiness, cold start)


def unix_get(path: Path, target: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET `target` on the Unix socket `path`; (status, body), the body read to its length."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
        return _exchange(sock, target)
    finally:
        sock.close()


def _exchange(sock: socket.socket, target: str) -> tuple[int, bytes]:
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: loader\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise BenchError(f"the connection closed before the headers of {target}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = None
    for line in lines[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == "content-length":
            length = int(value)
    while length is None or len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, body


def timed_first_answer(path: Path, target: str, timeout: float = 30.0) -> float:
    """Seconds from connect() to the complete answer to GET `target` (which must be a 200)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        started = time.perf_counter()
        sock.connect(str(path))
        status, _ = _exchange(sock, target)
        elapsed = time.perf_counter() - started
    finally:
        sock.close()
    if status != 200:
        raise BenchError(f"GET {target} answered {status}")
    return elapsed


def answers_health(path: Path) -> bool:
    try:
        return unix_get(path, "/health", timeout=2.0)[0] == 200
    except (OSError, BenchError):
        return False


@contextlib.contextmanager
def stopping(*children: Child) -> Iterator[None]:
    """Stop `children` when the block ends, however it ends."""
    try:
        yield
    finally:
        for child in reversed(children):
            child.stop()
