"""What systemd gives the daemon and expects back: the activated socket and sd_notify.

See sd_listen_fds(3) and sd_notify(3).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
from collections.abc import Callable, MutableMapping

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

    @property
    def enabled(self) -> bool:
        return self._notifier is not None

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
