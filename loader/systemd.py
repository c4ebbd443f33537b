"""What systemd gives the daemon and expects back: the activated socket and sd_notify.

See sd_listen_fds(3) and sd_notify(3).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import time
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path

import sdnotify

from loader.errors import ServerError

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3


def inherited_socket(env: MutableMapping[str, str]) -> socket.socket | None:
    """The listening socket systemd passed us, or None when we were not socket-activated.

    The LISTEN_* variables are removed from `env`, so that no child ever claims the fd.
    """
    pid = env.pop("LISTEN_PID", None)
    fds = env.pop("LISTEN_FDS", None)
    env.pop("LISTEN_FDNAMES", None)
    if pid is None or fds is None:
        return None
    if pid != str(os.getpid()):
        # Meant for another process (a forking wrapper): fd 3 is not ours to take.
        log.warning(
            "LISTEN_PID is %s, not this process (%d): not socket-activated", pid, os.getpid()
        )
        return None
    if fds != "1":
        raise ServerError(f"expected one socket from systemd (LISTEN_FDS=1), got LISTEN_FDS={fds}")
    fd = SD_LISTEN_FDS_START
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise ServerError(
            f"systemd said fd {fd} is our socket, but it is not open: {exc}"
        ) from None
    if not stat.S_ISSOCK(mode):
        raise ServerError(f"systemd said fd {fd} is our socket, but it is not a socket")
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ServerError(
            f"fd {fd} must be a Unix stream socket (ListenStream= in the .socket unit)"
        )
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise ServerError(f"fd {fd} is a Unix socket that is not listening")
    sock.set_inheritable(False)
    return sock


def answer_waiting(sock: socket.socket, status: str, body: bytes, limit: int = 64) -> int:
    """Answer each request waiting in `sock`'s backlog with `status` and `body` (JSON), and
    return how many were answered.

    A daemon that cannot start (a bad setting) does this before it exits: a connection left
    waiting would make the socket unit start it again at once, in a loop for as long as the
    connection stays queued (even after its client gave up). Each request's head and a small
    body are read first: closing a Unix socket with unread data resets the caller.
    """
    answered = 0
    sock.setblocking(False)
    while answered < limit:
        try:
            conn, _ = sock.accept()
        except (BlockingIOError, InterruptedError):
            break
        except OSError as exc:
            log.warning("could not take a waiting request: %s", exc)
            break
        with conn:
            try:
                conn.settimeout(1.0)
                _read_request(conn)
                head = (
                    f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                )
                conn.sendall(head.encode() + body)
                conn.shutdown(socket.SHUT_WR)
                _read_request(conn)  # what is left of a body, until the caller closes
            except OSError as exc:
                # The caller hung up or stalled: it gets no answer, the next one still does.
                log.debug("a waiting request went unanswered: %s", exc)
        answered += 1
    return answered


def _read_request(conn: socket.socket, most: int = 1 << 16) -> None:
    """Read the request's head and as much of its body as Content-Length says (up to `most`)."""
    data = b""
    while b"\r\n\r\n" not in data and len(data) < most:
        chunk = conn.recv(4096)
        if not chunk:
            return
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            length = int(value.strip())
    left = min(length, most) - len(rest)
    while left > 0:
        chunk = conn.recv(min(left, 4096))
        if not chunk:
            return
        left -= len(chunk)


class Notifier:
    """sd_notify, quietly absent when NOTIFY_SOCKET is unset (not under systemd).

    STATUS= shows in `systemctl status` to whoever may read it: redacted like the log.
    """

    def __init__(self, env: MutableMapping[str, str], redact: Callable[[str], str] = str) -> None:
        self._notifier = sdnotify.SystemdNotifier() if env.get("NOTIFY_SOCKET") else None
        self._redact = redact
        self.watchdog_interval = _watchdog_interval(env)
        self._last_status = ""

    def send(self, *fields: str) -> None:
        if self._notifier is not None:
            self._notifier.notify("\n".join(fields))

    def ready(self, status: str) -> None:
        self._last_status = status
        self.send("READY=1", f"STATUS={self._redact(status)}")

    def status(self, status: str) -> None:
        if status != self._last_status:
            self._last_status = status
            self.send(f"STATUS={self._redact(status)}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=Stopping")

    async def watchdog(self) -> None:
        """Ping at half the interval systemd asked for, from the event loop: a stuck loop misses."""
        if self.watchdog_interval is None:
            return
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval / 2)


def _watchdog_interval(env: MutableMapping[str, str]) -> float | None:
    usec = env.get("WATCHDOG_USEC")
    owner = env.get("WATCHDOG_PID")
    if not usec or (owner and owner != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not a number of microseconds", usec)
        return None
    return value / 1_000_000 if value > 0 else None


# A crash loop: this many runs in a row, each ended by a crash within CRASH_LOOP_WINDOW of its
# start (a run that ends later is a crash on its own, not part of a loop).
CRASH_LOOP_RUNS = 5
CRASH_LOOP_WINDOW = 60.0


class Runs:
    """How the daemon's last runs ended, kept in `$RUNTIME_DIRECTORY/runs` (/run/azaion-loader)
    to stop systemd's restarts of a daemon that crashes in a loop.

    The unit restarts a crashed daemon (`Restart=on-failure`) and sets no start limit, since
    systemd would count clean starts too and fail the socket with it. So the daemon counts:
    each start records itself, a clean exit clears the record, and a start that finds a
    record left by a run that crashed within a minute of its start counts one more crash
    in a row. The start after CRASH_LOOP_RUNS of them stops the loop: it exits with a status
    the unit does not restart (75). The next start (a request, or someone starting it) runs
    the daemon again: once, if the cause is still there.

    Times are the monotonic clock's, which counts from boot for every process (a device
    without a real-time clock jumps when it first syncs). /run is emptied at boot, so a
    power cut is not a crash. Not under systemd
    (no RUNTIME_DIRECTORY), nothing is kept and nothing is stopped.
    """

    def __init__(self, directory: Path | None, now: Callable[[], float] = time.monotonic) -> None:
        self.path = directory / "runs" if directory is not None else None
        self._now = now
        self.crashes = 0
        self._stopped = False

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Runs:
        directory = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
        return cls(Path(directory) if directory else None)

    def start(self) -> bool:
        """Count the crashes in a row before this start and record it; False when this
        start ends a crash loop (it must not run)."""
        if self.path is None:
            return True
        now = self._now()
        last = self._read()
        if last is not None and last[0] == "running":
            started, crashes = last[1], last[2]
            self.crashes = crashes + 1 if now - started < CRASH_LOOP_WINDOW else 1
        elif last is not None:
            # Started again after a loop was stopped: by a request, or by hand. Try once.
            self.crashes, self._stopped = last[2], True
        if self.crashes >= CRASH_LOOP_RUNS and not self._stopped:
            self._write(f"stopped {self.crashes}")
            return False
        self._write(f"running {now:.3f} {self.crashes}")
        return True

    def clean(self) -> None:
        """The daemon ends on purpose (a stop, or a setting no restart can fix)."""
        if self.path is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot clear %s: %s", self.path, exc)

    def _read(self) -> tuple[str, float, int] | None:
        """("running", started, crashes) or ("stopped", 0, crashes), None when nothing is kept."""
        assert self.path is not None
        try:
            words = self.path.read_text().split()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("ignoring %s, which cannot be read: %s", self.path, exc)
            return None
        with contextlib.suppress(ValueError, IndexError):
            if words[0] == "running" and len(words) == 3:
                return ("running", float(words[1]), int(words[2]))
            if words[0] == "stopped" and len(words) == 2:
                return ("stopped", 0.0, int(words[1]))
        log.warning("ignoring %s: not a record of the last run", self.path)
        return None

    def _write(self, text: str) -> None:
        assert self.path is not None
        part = self.path.with_name(self.path.name + ".part")
        try:
            part.write_text(text + "\n")
            part.replace(self.path)
        except OSError as exc:
            log.warning("cannot record this start in %s: %s", self.path, exc)
