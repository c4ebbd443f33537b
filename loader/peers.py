"""Who is calling: the peer credentials of a Unix socket connection (SO_PEERCRED).

They name the caller in the access log and, with ALLOWED_GROUPS/ALLOWED_UIDS, decide
who may use the daemon beyond the socket file's own mode.
"""

from __future__ import annotations

import functools
import os
import pwd
import socket
import struct
from dataclasses import dataclass

from aiohttp import web

from loader.errors import Forbidden
from loader.settings import Settings

_UCRED = struct.Struct("3i")


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int

    def __str__(self) -> str:
        return f"pid={self.pid} uid={self.uid} gid={self.gid}"


def peer_of(request: web.BaseRequest) -> Peer | None:
    """The calling process, or None when the transport is not a Unix socket."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        pid, uid, gid = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
    except OSError:
        return None
    return Peer(pid, uid, gid)


def check_allowed(settings: Settings, peer: Peer | None) -> None:
    """Forbidden unless ALLOWED_* are unset, or the caller is root or one they name."""
    if not settings.allowed_groups and not settings.allowed_uids:
        return
    if peer is None:
        raise Forbidden("cannot tell who is calling: access is limited by ALLOWED_GROUPS/UIDS")
    if peer.uid in (0, os.getuid()) or peer.uid in settings.allowed_uids:
        return
    if set(_groups_of(peer.uid, peer.gid)) & set(settings.allowed_groups):
        return
    raise Forbidden(
        f"uid {peer.uid} is not allowed to use azaion-loader: add it, or one of its groups, "
        "to ALLOWED_UIDS or ALLOWED_GROUPS"
    )


@functools.lru_cache(maxsize=256)
def _groups_of(uid: int, gid: int) -> tuple[int, ...]:
    # The user database, not /proc/PID: the unit hides other processes (ProtectProc=).
    try:
        return tuple(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    except KeyError:
        return (gid,)
