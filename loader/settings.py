"""The loader's configuration: read once from the environment at start, then immutable."""

from __future__ import annotations

import grp
import pwd
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from loader.errors import ConfigError

T = TypeVar("T")

# Docker's own rule for a tag.
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
# sockaddr_un.sun_path holds 108 bytes, one of them the terminating NUL.
_MAX_SOCKET_PATH = 107
_LOG_LEVELS = ("debug", "info", "warning", "error")


# Where azaion-loader.socket listens, and where clients look by default.
SOCKET_PATH = Path("/run/azaion-loader.sock")


@dataclass(frozen=True)
class Settings:
    """Everything the daemon is told by its environment; tests build it directly."""

    resource_api_url: str = "https://api.azaion.com"
    cdn_url: str = "https://cdn.azaion.com"
    images_path: Path = Path("/opt/azaion/images.enc")
    api_version: str = "latest"
    model_cache_dir: Path = Path("/var/lib/azaion-loader/models")
    socket_path: Path = SOCKET_PATH
    # None: the Docker SDK's own default (DOCKER_HOST, else the local socket).
    docker_host: str | None = None
    # Seconds. connect: reaching a remote; api: a whole small API call;
    # read: the longest silence tolerated inside a big transfer.
    connect_timeout: float = 10.0
    api_timeout: float = 30.0
    read_timeout: float = 60.0
    # Attempts after the first, for idempotent calls that failed in transit.
    api_retries: int = 3
    # Seconds that requests in flight get to finish after SIGTERM.
    shutdown_grace: float = 10.0
    max_upload_bytes: int = 8 * 1024**3
    log_level: str = "info"
    # Callers allowed on the socket beyond its file mode; both empty: whoever can connect.
    allowed_groups: tuple[int, ...] = ()
    allowed_uids: tuple[int, ...] = ()
    # Extra CA certificates for the Resource API and CDN; the system's are always trusted.
    tls_ca_file: Path | None = None
    # Refuse resources that the API keeps no integrity record for (resource-api.md).
    require_integrity: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Build from `env`; raises ConfigError naming the first bad variable."""
        defaults = cls()
        reader = _Reader(env)
        return cls(
            resource_api_url=reader.get("RESOURCE_API_URL", _url, defaults.resource_api_url),
            cdn_url=reader.get("CDN_URL", _url, defaults.cdn_url),
            images_path=reader.get("IMAGES_PATH", _path, defaults.images_path),
            api_version=reader.get("API_VERSION", _tag, defaults.api_version),
            model_cache_dir=reader.get("MODEL_CACHE_DIR", _path, defaults.model_cache_dir),
            socket_path=reader.get("LOADER_SOCKET", _socket_path, defaults.socket_path),
            docker_host=reader.get("DOCKER_HOST", _docker_host, defaults.docker_host),
            connect_timeout=reader.get("CONNECT_TIMEOUT", _seconds, defaults.connect_timeout),
            api_timeout=reader.get("API_TIMEOUT", _seconds, defaults.api_timeout),
            read_timeout=reader.get("READ_TIMEOUT", _seconds, defaults.read_timeout),
            api_retries=reader.get("API_RETRIES", _count, defaults.api_retries),
            shutdown_grace=reader.get("SHUTDOWN_GRACE", _seconds, defaults.shutdown_grace),
            max_upload_bytes=reader.get("MAX_UPLOAD_BYTES", _size, defaults.max_upload_bytes),
            log_level=reader.get("LOG_LEVEL", _log_level, defaults.log_level),
            allowed_groups=reader.get("ALLOWED_GROUPS", _groups, defaults.allowed_groups),
            allowed_uids=reader.get("ALLOWED_UIDS", _uids, defaults.allowed_uids),
            tls_ca_file=reader.get("TLS_CA_FILE", _ca_file, defaults.tls_ca_file),
            require_integrity=reader.get("REQUIRE_INTEGRITY", _flag, defaults.require_integrity),
        )


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def get(self, name: str, parse: Callable[[str], T], default: T) -> T:
        raw = self._env.get(name)
        if raw is None or raw.strip() == "":
            return default
        try:
            return parse(raw.strip())
        except ValueError as exc:
            raise ConfigError(name, f"{exc} (got {raw!r})") from None


def _url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https"):
        raise ValueError("must be an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError("must name a host")
    if parts.query or parts.fragment:
        raise ValueError("must not carry a query or a fragment")
    return raw.rstrip("/")


def _path(raw: str) -> Path:
    if "\0" in raw:
        raise ValueError("must not contain a NUL byte")
    return Path(raw)


def _socket_path(raw: str) -> Path:
    path = _path(raw)
    if len(str(path).encode()) > _MAX_SOCKET_PATH:
        raise ValueError(f"is longer than the {_MAX_SOCKET_PATH} bytes a Unix socket path may have")
    return path


def _tag(raw: str) -> str:
    if not _TAG.fullmatch(raw):
        raise ValueError("must be a Docker tag: letters, digits, '_', '.', '-', at most 128")
    return raw


def _docker_host(raw: str) -> str:
    if not re.match(r"(unix|tcp|ssh|npipe)://", raw):
        raise ValueError("must start with unix://, tcp://, ssh:// or npipe://")
    return raw


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("must be a number of seconds") from None
    if not 0 < value < 10**7:
        raise ValueError("must be a positive number of seconds")
    return value


def _count(raw: str) -> int:
    if not raw.isdigit() or int(raw) > 100:
        raise ValueError("must be a whole number from 0 to 100")
    return int(raw)


def _size(raw: str) -> int:
    if not raw.isdigit() or int(raw) == 0:
        raise ValueError("must be a positive number of bytes")
    return int(raw)


def _log_level(raw: str) -> str:
    if raw.lower() not in _LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(_LOG_LEVELS)}")
    return raw.lower()


def _groups(raw: str) -> tuple[int, ...]:
    """Group names or numbers, comma-separated."""
    return _ids(raw, lambda name: grp.getgrnam(name).gr_gid, "group")


def _uids(raw: str) -> tuple[int, ...]:
    """User names or numbers, comma-separated."""
    return _ids(raw, lambda name: pwd.getpwnam(name).pw_uid, "user")


def _ids(raw: str, lookup: Callable[[str], int], kind: str) -> tuple[int, ...]:
    ids = []
    for item in _items(raw):
        try:
            ids.append(int(item) if item.isdigit() else lookup(item))
        except KeyError:
            raise ValueError(f"no {kind} named {item!r}") from None
    return tuple(ids)


def _items(raw: str) -> list[str]:
    items = [item.strip() for item in raw.split(",") if item.strip()]
    if not items:
        raise ValueError("must list at least one name or number, comma-separated")
    return items


def _flag(raw: str) -> bool:
    value = raw.lower()
    if value not in ("1", "0", "yes", "no", "true", "false"):
        raise ValueError("must be 1 or 0 (yes/no, true/false)")
    return value in ("1", "yes", "true")


def _ca_file(raw: str) -> Path:
    """A file of PEM CA certificates, loaded once here so that a bad one stops the start."""
    path = _path(raw)
    try:
        ssl.create_default_context(cafile=str(path))
    except ssl.SSLError:
        raise ValueError("is not a PEM file of CA certificates") from None
    except OSError as exc:
        raise ValueError(f"cannot read it: {exc.strerror}") from None
    return path
