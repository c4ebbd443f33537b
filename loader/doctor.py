"""`azaion-loader doctor`: every check that tells why an unlock or a load would fail.

The daemon runs those it knows better (GET /doctor), as its own user: the engine, the
images it holds, the space where it spools, the archive, the remotes with their
certificates, the clock. The command adds what only the caller can see: the socket, its
group, the socket unit. Each check is bounded in time; the daemon's run concurrently.
"""

from __future__ import annotations

import asyncio
import email.utils
import grp
import logging
import os
import pwd
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from loader.errors import LoaderError, RemoteUntrusted
from loader.images import STACK_IMAGES, gigabytes, space_shortfall, stack_tags

if TYPE_CHECKING:
    from loader.images import Docker
    from loader.remote import ResourceAPI
    from loader.settings import Settings

log = logging.getLogger(__name__)

OK, WARNING, FAILED = "ok", "warning", "failed"
CHECK_TIMEOUT = 10.0
# The remote's Date header against our clock: TLS tolerates minutes, not a day.
CLOCK_WARNING = 300
CLOCK_FAILED = 86400
SOCKET_UNIT = "azaion-loader.socket"
_DEFAULTS = "/etc/default/azaion-loader"
_ENGINE_HINT = (
    "start the engine (sudo systemctl start docker, or podman.socket); "
    f"DOCKER_HOST in {_DEFAULTS} names it"
)
_START_HINT = f"sudo systemctl enable --now {SOCKET_UNIT} (or run `azaion-loader serve`)"


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # OK, WARNING or FAILED
    detail: str  # the figure, or the cause
    hint: str = ""  # what to do, when not ok

    def line(self) -> str:
        hint = f" -> {self.hint}" if self.hint and self.status != OK else ""
        return f"{self.status:<8}{self.name:<14}{self.detail}{hint}"

    def as_json(self) -> dict[str, str]:
        return asdict(self)


async def daemon_checks(
    settings: Settings, api: ResourceAPI, docker: Docker, redact: Callable[[str], str]
) -> list[Check]:
    """The daemon's checks, engine side and remote side at once, in a fixed order."""
    checks = _DaemonChecks(settings, api, docker)
    engine, remote = await asyncio.gather(checks.engine_side(), checks.remote_side())
    return [replace(c, detail=redact(c.detail), hint=redact(c.hint)) for c in engine + remote]


class _DaemonChecks:
    def __init__(self, settings: Settings, api: ResourceAPI, docker: Docker) -> None:
        self._settings = settings
        self._api = api
        self._docker = docker
        self._missing: list[str] | None = None  # the stack's images the engine lacks
        self._date: str | None = None  # the remote's clock

    async def engine_side(self) -> list[Check]:
        engine = await _bounded("engine", _ENGINE_HINT, self._engine())
        if engine.status == FAILED:
            unchecked = "not checked: the engine cannot be reached"
            archive = await _bounded("archive", "", asyncio.to_thread(self._archive))
            return [
                engine,
                Check("images", WARNING, unchecked),
                Check("space", WARNING, unchecked),
                archive,
            ]
        images = await _bounded("images", _ENGINE_HINT, self._images())
        space, archive = await asyncio.gather(
            _bounded("space", "", self._space()),
            _bounded("archive", "", asyncio.to_thread(self._archive)),
        )
        return [engine, images, space, archive]

    async def remote_side(self) -> list[Check]:
        checks = await asyncio.gather(
            _bounded("resource-api", "", self._remote(cdn=False)),
            _bounded("cdn", "", self._remote(cdn=True)),
        )
        return [*checks, clock_check(time.time(), self._date)]

    async def _engine(self) -> Check:
        return Check("engine", OK, await asyncio.to_thread(self._docker.describe))

    async def _images(self) -> Check:
        tags = stack_tags(self._settings.api_version)
        self._missing = await asyncio.to_thread(self._docker.missing, tags)
        held = len(tags) - len(self._missing)
        detail = f"{held} of {len(tags)} images of the stack at {self._settings.api_version}"
        if self._missing:
            detail += f"; `azaion-loader unlock` loads the other {len(self._missing)}"
        return Check("images", OK, detail)

    async def _space(self) -> Check:
        docker = self._docker
        spools = await asyncio.to_thread(docker.spools)
        if not spools:
            return Check(
                "space",
                WARNING,
                f"cannot see where {docker.name} keeps its images (a remote engine, or "
                "another mount namespace): free space not checked",
            )
        free = ", ".join(f"{gigabytes(s.free)} free under {s.path} ({s.role})" for s in spools)
        if not self._missing:
            return Check("space", OK, f"{free}; nothing to load")
        try:
            size = (await asyncio.to_thread(os.stat, self._settings.images_path)).st_size
        except OSError:
            return Check("space", WARNING, f"{free}; no archive to size the unlock by")
        # Without the key the archive's images are unknown: its size stands for the layers,
        # and the largest image's spool, on top, is left out.
        shortfall = space_shortfall(docker.name, spools, size, largest=0, podman_spool=0)
        if shortfall is None:
            return Check("space", OK, f"{free}; the archive is {_size(size)}")
        # With none of the images held, the unlock would load them all and refuse for sure.
        status = FAILED if len(self._missing) == len(STACK_IMAGES) else WARNING
        return Check(
            "space",
            status,
            f"{shortfall}, for an archive of {_size(size)}",
            f"free space there, or move {docker.name}'s data root to a bigger filesystem",
        )

    def _archive(self) -> Check:
        """In a worker thread: the archive opened and read by this process's own user."""
        path = self._settings.images_path
        user = _user_name(os.geteuid())
        try:
            # A FIFO or a device would block open() or read forever.
            mode = os.stat(path).st_mode
            if not stat.S_ISREG(mode):
                return Check(
                    "archive", FAILED, f"{path} is not a regular file", "put the archive there"
                )
            with open(path, "rb") as archive:
                archive.read(1)
                size = os.fstat(archive.fileno()).st_size
        except FileNotFoundError:
            if self._missing == []:
                return Check(
                    "archive", OK, f"none at {path}, nor needed: the engine has every image"
                )
            return Check(
                "archive",
                FAILED,
                f"no image archive at {path}",
                f"copy it there, or set IMAGES_PATH in {_DEFAULTS}",
            )
        except OSError as exc:
            group = _group_name(os.getegid())
            return Check(
                "archive",
                FAILED,
                f"cannot read {path} as user {user}: {exc.strerror}",
                f"sudo chgrp {group} {path} && sudo chmod g+r {path} (and x on its folders)",
            )
        return Check("archive", OK, f"{path}, {_size(size)}, readable by user {user}")

    async def _remote(self, cdn: bool) -> Check:
        name, variable = ("cdn", "CDN_URL") if cdn else ("resource-api", "RESOURCE_API_URL")
        url = self._settings.cdn_url if cdn else self._settings.resource_api_url
        try:
            date = await self._api.reach(cdn=cdn)
        except RemoteUntrusted as exc:
            hint = f"set TLS_CA_FILE in {_DEFAULTS} to the CA that signs it; check the clock too"
            return Check(name, FAILED, exc.message, hint)
        except LoaderError as exc:
            hint = f"check the network, DNS and proxy, and {variable} in {_DEFAULTS}"
            return Check(name, FAILED, exc.message, hint)
        self._date = self._date or date
        trusted = ", certificate trusted" if url.startswith("https:") else ""
        return Check(name, OK, f"{url} answers{trusted}")


def clock_check(now: float, date: str | None) -> Check:
    """Our clock against a remote's HTTP Date header (one-second resolution)."""
    try:
        remote = email.utils.parsedate_to_datetime(date or "").timestamp()
    except (TypeError, ValueError, IndexError):
        return Check("clock", WARNING, "not checked: no remote answered with its time")
    skew = now - remote
    detail = f"{abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} the remote's clock"
    if abs(skew) <= CLOCK_WARNING:
        return Check("clock", OK, detail)
    status = FAILED if abs(skew) > CLOCK_FAILED else WARNING
    if abs(skew) > 3600:
        detail = f"{abs(skew) / 3600:.1f} h {detail.split(' s ', 1)[1]}"
    hint = "certificates are checked against it: sudo timedatectl set-ntp true"
    return Check("clock", status, detail, hint)


async def _bounded(name: str, hint: str, check: Awaitable[Check]) -> Check:
    """The check's answer, or its failure, within CHECK_TIMEOUT."""
    try:
        return await asyncio.wait_for(check, CHECK_TIMEOUT)
    except asyncio.TimeoutError:
        return Check(name, FAILED, f"no answer within {CHECK_TIMEOUT:.0f} s", hint)
    except LoaderError as exc:
        return Check(name, FAILED, exc.message, hint)
    except Exception as exc:
        log.exception("the %s check failed unexpectedly", name)
        return Check(name, FAILED, f"unexpected error: {exc}", "see the daemon's log")


def client_checks(socket_path: str, default_socket: str) -> list[Check]:
    """What the caller sees: the socket, whether it may connect, the socket unit."""
    checks = [_socket(socket_path)]
    if checks[0].status == OK:
        checks.append(_access(socket_path))
    if socket_path == default_socket and (state := socket_unit_state()) is not None:
        if state == "active":
            checks.append(Check("socket-unit", OK, f"{SOCKET_UNIT} is active"))
        else:
            hint = f"sudo systemctl enable --now {SOCKET_UNIT}"
            checks.append(Check("socket-unit", FAILED, f"{SOCKET_UNIT} is {state}", hint))
    return checks


def socket_unit_state() -> str | None:
    """`systemctl is-active` of the socket unit, or None where there is no systemctl."""
    if not shutil.which("systemctl"):
        return None
    answer = subprocess.run(
        ["systemctl", "is-active", SOCKET_UNIT],
        capture_output=True,
        text=True,
        check=False,
        timeout=CHECK_TIMEOUT,
    )
    return answer.stdout.strip() or "unknown"


def _socket(path: str) -> Check:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return Check("socket", FAILED, f"no socket at {path}", _START_HINT)
    except OSError as exc:
        return Check("socket", FAILED, f"cannot see {path}: {exc.strerror}", "run as root to see")
    if not stat.S_ISSOCK(info.st_mode):
        return Check("socket", FAILED, f"{path} is not a socket", _START_HINT)
    owner = f"{_user_name(info.st_uid)}:{_group_name(info.st_gid)}"
    return Check("socket", OK, f"{path} ({stat.filemode(info.st_mode)} {owner})")


def _access(path: str) -> Check:
    user = _user_name(os.geteuid())
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(CHECK_TIMEOUT)
        probe.connect(path)
    except PermissionError:
        group = _group_name(os.stat(path).st_gid)
        return Check(
            "access",
            FAILED,
            f"permission denied on {path}: {user} is not in group {group}",
            f"sudo usermod -aG {group} {user}, then log in again",
        )
    except OSError as exc:
        return Check("access", FAILED, f"cannot connect to {path}: {exc.strerror}", _START_HINT)
    finally:
        probe.close()
    return Check("access", OK, f"{user} may connect")


def _size(size: int) -> str:
    return gigabytes(size) if size >= 1e9 else f"{size / 1e6:.1f} MB"


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def checks_from(answer: Any) -> list[Check]:
    """The daemon's checks from its JSON answer."""
    items = answer.get("checks") if isinstance(answer, dict) else None
    return [
        Check(*(str(item.get(key) or "") for key in ("name", "status", "detail", "hint")))
        for item in items or ()
        if isinstance(item, dict)
    ]
