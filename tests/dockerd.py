"""A private Docker daemon and the stack's images, for tests and benchmarks.

    with PrivateDockerd() as daemon:
        tags = build_stack_images(daemon, "latest", payload_bytes=50 << 20)
        info = write_archive(daemon, tags, fragment, Path("images.enc"))

Nothing is pulled: each image is imported from a small root filesystem generated here.
Everything the daemon creates lives under its own folders, and `stop` removes it all.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import docker
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from loader.crypto import Encryptor, key_from_fragment
from loader.images import STACK_IMAGES
from tests.polling import poll

# The stack's images, as the loader names them.
STACK_NAMES: tuple[str, ...] = STACK_IMAGES
DEFAULT_SEED = 1
MiB = 1 << 20
PAYLOAD_FILE_MAX = 64 * MiB
# Fixed so that the same seed gives the same layers (and the same diff ids) every time.
_MTIME = 1_700_000_000
_SOCKET_PATH_MAX = 107
# dockerd, containerd, containerd-shim*, runc, docker-proxy (as /proc/PID/comm has them).
_DOCKER_PROGRAMS = ("dockerd", "containerd", "runc", "docker")
# dockerd makes this for plugin discovery wherever its exec root is.
_RUN_DOCKER = Path("/run/docker")
_SEARCH_DIRS = ("/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/sbin", "/usr/local/bin")

# A daemon, a host URL ("unix:///..."), or a Docker SDK client (APIClient or DockerClient).
Target = Union["PrivateDockerd", str, Any]


class DockerdError(RuntimeError):
    """The private daemon did not start, or left something behind when stopped."""


def _find_binary(name: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), *_SEARCH_DIRS])
    return shutil.which(name, path=path)


def ping(sock: Path, timeout: float = 1.0) -> bool:
    """True when dockerd answers GET /_ping on `sock` with 200 OK."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(timeout)
    try:
        probe.connect(str(sock))
        probe.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        answer = b""
        while chunk := probe.recv(4096):
            answer += chunk
    except OSError:
        return False
    finally:
        probe.close()
    return answer.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")) and answer.endswith(b"OK")


def _unescape_mountinfo(field: str) -> str:
    return field.encode().decode("unicode_escape").encode("latin-1").decode()


def mounts_under(*roots: Path) -> list[str]:
    """Mount points at or under any of `roots`, deepest first."""
    prefixes = [str(r).rstrip("/") for r in roots]
    found: list[str] = []
    with open("/proc/self/mountinfo") as info:
        for line in info:
            point = _unescape_mountinfo(line.split()[4])
            if any(point == p or point.startswith(p + "/") for p in prefixes):
                found.append(point)
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


def processes_mentioning(*roots: Path) -> list[int]:
    """Live (not zombie) Docker processes whose command line names a path under `roots`."""
    needles = [str(r).rstrip("/").encode() + b"/" for r in roots]
    pids: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            comm = (entry / "comm").read_text()
        except OSError:
            continue
        if (
            comm.startswith(_DOCKER_PROGRAMS)
            and any(n in cmdline for n in needles)
            and _alive(int(entry.name))
        ):
            pids.append(int(entry.name))
    return pids


def _alive(pid: int) -> bool:
    """True when `pid` runs (a zombie does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _umount(path: str) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    mnt_detach = 2
    if libc.umount2(path.encode(), 0) != 0 and libc.umount2(path.encode(), mnt_detach) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"cannot unmount {path}: {os.strerror(errno)}")


class PrivateDockerd:
    """A dockerd of its own: own data root, exec root, socket, containerd namespaces.

    `root` holds the data root, the pidfile and the log (default: a new folder under
    /tmp). The exec root and the socket always go in a short folder under /tmp, as
    Unix socket paths are limited to 107 bytes. `start` after `kill` reuses the data root.
    """

    def __init__(
        self,
        root: Path | None = None,
        *,
        binary: str | None = None,
        start_timeout: float = 30.0,
        stop_timeout: float = 15.0,
    ) -> None:
        self._short = Path(tempfile.mkdtemp(prefix="azl-", dir="/tmp"))
        self.root = self._short if root is None else Path(root).absolute()
        self.data_root = self.root / "data"
        self.exec_root = self._short / "x"
        self.socket = self._short / "docker.sock"
        self.pidfile = self.root / "docker.pid"
        self.log_path = self.root / "dockerd.log"
        self.binary = binary
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._made_run_docker = False
        if len(str(self.exec_root / "containerd" / "containerd.sock.ttrpc")) > _SOCKET_PATH_MAX:
            raise ValueError(f"{self._short} is too long for Unix socket paths")

    @staticmethod
    def available() -> str | None:
        """Why a private dockerd cannot run here, or None when it can."""
        if os.geteuid() != 0:
            return "a private dockerd needs root"
        for name in ("dockerd", "containerd", "runc"):
            if _find_binary(name) is None:
                return f"no {name} binary (install docker.io)"
        return None

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        binary = self.binary or _find_binary("dockerd") or "dockerd"
        return [
            binary,
            f"--data-root={self.data_root}",
            f"--exec-root={self.exec_root}",
            f"--pidfile={self.pidfile}",
            f"--host={self.host}",
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-forward=false",
            "--ip-masq=false",
            "--containerd-namespace=azl-test-moby",
            "--containerd-plugins-namespace=azl-test-plugins",
        ]

    def start(self) -> PrivateDockerd:
        """Start dockerd and wait until it answers /_ping; DockerdError if it does not."""
        if self.running:
            raise DockerdError(f"dockerd is already running as pid {self.pid}")
        self._short.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([env.get("PATH", ""), *_SEARCH_DIRS])
        env.pop("DOCKER_HOST", None)
        self._drop_stale_containerd_pidfile()
        self._made_run_docker = self._made_run_docker or not _RUN_DOCKER.exists()
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                close_fds=True,
            )
        proc = self._proc
        ready = poll(lambda: proc.poll() is not None or ping(self.socket), self.start_timeout)
        if proc.poll() is not None:
            self._proc = None
            raise DockerdError(f"dockerd exited with {proc.returncode}\n{self.log_tail()}")
        if not ready:
            self.kill()
            raise DockerdError(f"dockerd did not answer in {self.start_timeout} s")
        return self

    def kill(self) -> None:
        """SIGKILL dockerd, as a crash would; its data root stays for a later `start`.

        Returns once its containerd (killed along by dockerd's parent-death signal) is gone.
        """
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
        self._proc.wait()
        self._proc = None
        if not poll(lambda: not self.processes(), self.stop_timeout):
            raise DockerdError(f"processes left after SIGKILL: {self.processes()}")

    def stop(self) -> None:
        """SIGTERM (SIGKILL after `stop_timeout`), then remove every process, mount and file."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self._proc.send_signal(signal.SIGKILL)
                self._proc.wait()
            self._proc = None
        roots = self._roots()
        for pid in processes_mentioning(*roots):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not poll(lambda: not processes_mentioning(*roots), self.stop_timeout):
            raise DockerdError(f"processes left behind: {processes_mentioning(*roots)}")
        # A killed dockerd leaves its bind mount of the data root; a restart can stack another.
        for _ in range(20):
            points = mounts_under(*roots)
            if not points:
                break
            for point in points:
                with contextlib.suppress(OSError):
                    _umount(point)
        if left := mounts_under(*roots):
            raise DockerdError(f"mounts left behind: {left}")
        for path in roots:
            shutil.rmtree(path, ignore_errors=True)
        if self._made_run_docker:
            for folder in (_RUN_DOCKER / "plugins", _RUN_DOCKER):
                with contextlib.suppress(OSError):
                    folder.rmdir()

    def processes(self) -> list[int]:
        """Live processes that belong to this daemon (dockerd, its containerd, shims)."""
        return processes_mentioning(*self._roots())

    def mounts(self) -> list[str]:
        return mounts_under(*self._roots())

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def api(self, timeout: float = 120.0) -> Any:
        """A low-level Docker SDK client (docker.APIClient) for this daemon; close it after use."""
        return docker.APIClient(base_url=self.host, version="auto", timeout=timeout)

    def _drop_stale_containerd_pidfile(self) -> None:
        # dockerd adopts the containerd its pidfile names if kill(pid, 0) succeeds, which
        # it does for a zombie: an init that does not reap would make the restart hang.
        pidfile = self.exec_root / "containerd" / "containerd.pid"
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        if not _alive(pid):
            pidfile.unlink(missing_ok=True)

    def _roots(self) -> list[Path]:
        return [self._short] if self.root == self._short else [self.root, self._short]

    def __enter__(self) -> PrivateDockerd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def _api(target: Target) -> Iterator[Any]:
    """An APIClient for `target`, closed afterwards only if made here."""
    if isinstance(target, PrivateDockerd):
        target = target.host
    if isinstance(target, str):
        client = docker.APIClient(base_url=target, version="auto", timeout=120)
        try:
            yield client
        finally:
            client.close()
    elif isinstance(target, docker.DockerClient):
        yield target.api
    else:
        yield target


def stack_tags(version: str, names: Sequence[str] = STACK_NAMES) -> list[str]:
    return [f"{name}:{version}" for name in names]


def _random_stream(seed: int, name: str) -> Any:
    """A fast deterministic random stream per (seed, image): AES-CTR over zeros."""
    key = hashlib.sha256(f"azl-payload:{seed}:{name}".encode()).digest()
    return Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()


def _tar_header(name: str, size: int, kind: bytes = tarfile.REGTYPE, mode: int = 0o644) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.type = kind
    info.mode = mode
    info.mtime = _MTIME
    return info.tobuf(format=tarfile.GNU_FORMAT)


def _tar_file(name: str, data: bytes) -> bytes:
    return _tar_header(name, len(data)) + data + bytes(-len(data) % tarfile.BLOCKSIZE)


def rootfs_chunks(
    name: str,
    version: str,
    payload_bytes: int = 0,
    seed: int = DEFAULT_SEED,
    chunk: int = MiB,
) -> Iterator[bytes]:
    """A root filesystem tar for image `name`, streamed: a few small files naming the
    service, then `payload_bytes` of random data in files of at most 64 MiB."""
    service = name.rsplit("/", 1)[-1]
    for folder in ("etc/", "etc/azaion/", "opt/", f"opt/{service}/"):
        yield _tar_header(folder, 0, tarfile.DIRTYPE, 0o755)
    yield _tar_file("etc/azaion/service", f"{name}\n".encode())
    yield _tar_file("etc/azaion/version", f"{version}\n".encode())
    yield _tar_file(f"opt/{service}/README", f"{name}:{version}, seed {seed}\n".encode())
    stream = _random_stream(seed, f"{name}:{version}")
    left = payload_bytes
    index = 0
    while left > 0:
        size = min(left, PAYLOAD_FILE_MAX)
        yield _tar_header(f"opt/{service}/payload-{index:03d}.bin", size)
        written = 0
        while written < size:
            piece = min(chunk, size - written)
            yield stream.update(bytes(piece))
            written += piece
        # Never an empty chunk: in a chunked HTTP body that would mean the end.
        if size % tarfile.BLOCKSIZE:
            yield bytes(-size % tarfile.BLOCKSIZE)
        left -= size
        index += 1
    yield bytes(2 * tarfile.BLOCKSIZE)


def _check_stream(answer: Any, what: str) -> None:
    """Docker answers some calls with JSON lines whose errors come with a 200; raise them."""
    text = answer.decode() if isinstance(answer, bytes) else str(answer)
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            item = json.loads(line)
            if isinstance(item, dict) and (item.get("error") or item.get("errorDetail")):
                raise DockerdError(f"{what}: {item.get('error') or item['errorDetail']}")


def build_stack_images(
    target: Target,
    version: str = "latest",
    payload_bytes: int = 0,
    seed: int = DEFAULT_SEED,
    names: Sequence[str] = STACK_NAMES,
    workers: int = 4,
) -> list[str]:
    """Import one image per name, tagged `name:version`; returns the tags.

    Each gets `payload_bytes // len(names)` bytes of random data, so the images differ
    and the archive does not compress. Imports run `workers` at a time, each on its own
    connection, when `target` is a daemon or a host (an SDK client is used serially).
    """
    per_image = payload_bytes // len(names) if names else 0

    def one(api: Any, name: str) -> None:
        chunks = rootfs_chunks(name, version, per_image, seed)
        answer = api.import_image_from_data(chunks, repository=name, tag=version)
        _check_stream(answer, f"importing {name}:{version}")

    def own_connection(name: str) -> None:
        with _api(host) as api:
            one(api, name)

    host = target.host if isinstance(target, PrivateDockerd) else target
    if isinstance(host, str) and workers > 1 and per_image > 0:
        with ThreadPoolExecutor(min(workers, len(names))) as pool:
            list(pool.map(own_connection, names))
    else:
        with _api(target) as api:
            for name in names:
                one(api, name)
    return stack_tags(version, names)


BASE_NAME = "azaion/base"


def _measure(chunks: Iterable[bytes]) -> tuple[int, str]:
    size, digest = 0, hashlib.sha256()
    for piece in chunks:
        size += len(piece)
        digest.update(piece)
    return size, "sha256:" + digest.hexdigest()


def shared_base_save_chunks(
    version: str,
    payload_bytes: int,
    base_share: float,
    seed: int = DEFAULT_SEED,
    names: Sequence[str] = STACK_NAMES,
) -> Iterator[bytes]:
    """A `docker save` tar (legacy layout) of the stack on a shared base, streamed: each
    image is the base layer (`base_share` of the payload) and a layer of its own (an equal
    share of the rest), like images built FROM one runtime image.

    Each layer is generated twice (its size and digest must precede it in the tar): the
    random stream is deterministic, so the two passes agree.
    """
    base_bytes = int(payload_bytes * base_share)
    own_bytes = (payload_bytes - base_bytes) // len(names) if names else 0
    layers = [(BASE_NAME, base_bytes)] + [(name, own_bytes) for name in names]
    digests: dict[str, str] = {}
    for name, size in layers:
        length, digest = _measure(rootfs_chunks(name, version, size, seed))
        digests[name] = digest
        yield _tar_header(f"{digest[7:]}/layer.tar", length)
        # Whole 512-byte records: rootfs_chunks pads its own files.
        yield from rootfs_chunks(name, version, size, seed)
    manifest = []
    for name in names:
        config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "created": "2023-11-14T22:13:20Z",
                "config": {"Labels": {"service": name}},
                "rootfs": {"type": "layers", "diff_ids": [digests[BASE_NAME], digests[name]]},
            }
        ).encode()
        config_name = hashlib.sha256(config).hexdigest() + ".json"
        yield _tar_file(config_name, config)
        manifest.append(
            {
                "Config": config_name,
                "RepoTags": [f"{name}:{version}"],
                "Layers": [f"{digests[n][7:]}/layer.tar" for n in (BASE_NAME, name)],
            }
        )
    yield _tar_file("manifest.json", json.dumps(manifest).encode())
    yield bytes(2 * tarfile.BLOCKSIZE)


def build_shared_base_stack(
    target: Target,
    version: str = "latest",
    payload_bytes: int = 0,
    base_share: float = 0.4,
    seed: int = DEFAULT_SEED,
    names: Sequence[str] = STACK_NAMES,
) -> list[str]:
    """Load the stack on a shared base (`shared_base_save_chunks`) into the daemon; returns
    the tags. Nothing runs: the images come from a generated `docker save` tar."""
    chunks = shared_base_save_chunks(version, payload_bytes, base_share, seed, names)
    with _api(target) as api:
        for message in api.load_image(chunks) or ():
            if isinstance(message, dict) and (message.get("error") or message.get("errorDetail")):
                raise DockerdError(f"loading the stack: {message}")
    return stack_tags(version, names)


def image_ids(target: Target, tags: Iterable[str]) -> dict[str, str]:
    """Each tag's image id (sha256:...)."""
    with _api(target) as api:
        return {tag: api.inspect_image(tag)["Id"] for tag in tags}


def present_images(target: Target, tags: Iterable[str]) -> list[str]:
    """Those of `tags` that the daemon has, in the order given."""
    with _api(target) as api:
        have = {t for image in api.images() for t in image.get("RepoTags") or ()}
    return [tag for tag in tags if tag in have]


def remove_images(target: Target, tags: Iterable[str]) -> None:
    """Remove the images (and their layers once unused); absent ones are fine."""
    with _api(target) as api:
        for tag in tags:
            with contextlib.suppress(docker.errors.ImageNotFound):
                api.remove_image(tag, force=True)


def save_chunks(target: Target, tags: Sequence[str], chunk: int = MiB) -> Iterator[bytes]:
    """`docker save` of all `tags` as one tar, streamed (GET /images/get?names=...)."""
    if not tags:
        raise ValueError("no images to save")
    with _api(target) as api:
        # The SDK's get_image takes one name; the endpoint takes many.
        response = api._get(api._url("/images/get"), params={"names": list(tags)}, stream=True)
        try:
            yield from api._stream_raw_result(response, chunk, False)
        finally:
            response.close()


@dataclass(frozen=True)
class ArchiveInfo:
    """A written archive: its path, and the size and SHA-256 (hex) of its plaintext tar."""

    path: Path
    plaintext_size: int
    plaintext_sha256: str

    @property
    def size(self) -> int:
        return self.path.stat().st_size


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[Any]:
    """A file written as `path`.tmp and renamed to `path` only if the block succeeds."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as out:
            yield out
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_atomically(path: Path, chunks: Iterable[bytes]) -> None:
    with _atomic_file(path) as out:
        for piece in chunks:
            out.write(piece)


def write_archive(
    target: Target,
    tags: Sequence[str],
    fragment: bytes,
    path: Path,
    chunk: int = MiB,
    iv: bytes | None = None,
    plain: Path | None = None,
) -> ArchiveInfo:
    """The images' `docker save` tar, encrypted with SHA-256(fragment), into `path`.

    Streamed end to end: the plaintext is never whole in memory, and on disk only when
    `plain` asks for a copy of it (two saves of the same images differ in a few bytes).
    """
    digest = hashlib.sha256()
    size = 0
    encryptor = Encryptor(key_from_fragment(fragment), iv)

    def encrypted(copy: Any) -> Iterator[bytes]:
        nonlocal size
        for piece in save_chunks(target, tags, chunk):
            digest.update(piece)
            size += len(piece)
            if copy is not None:
                copy.write(piece)
            yield encryptor.update(piece)
        yield encryptor.finalize()

    if plain is None:
        _write_atomically(Path(path), encrypted(None))
    else:
        with _atomic_file(Path(plain)) as copy:
            _write_atomically(Path(path), encrypted(copy))
    return ArchiveInfo(Path(path), size, digest.hexdigest())


def write_plain_tar(
    target: Target, tags: Sequence[str], path: Path, chunk: int = MiB
) -> ArchiveInfo:
    """The images' `docker save` tar as is: the reference for `docker load -i`."""
    digest = hashlib.sha256()
    size = 0

    def plain() -> Iterator[bytes]:
        nonlocal size
        for piece in save_chunks(target, tags, chunk):
            digest.update(piece)
            size += len(piece)
            yield piece

    _write_atomically(Path(path), plain())
    return ArchiveInfo(Path(path), size, digest.hexdigest())


def tar_of(files: dict[str, bytes], form: int = tarfile.GNU_FORMAT) -> bytes:
    """A tar holding `files`, as Python's tarfile writes it in `form`."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=form) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = _MTIME
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def layer_tar(name: str, size: int) -> bytes:
    """A layer: one file of `size` random bytes under opt/NAME/."""
    return tar_of({f"opt/{name}/payload.bin": os.urandom(size)})


def oci_save(images: dict[str, list[bytes]]) -> bytes:
    """A `docker save` tar in the OCI layout of Docker >= 25: `oci-layout`, `index.json`,
    `blobs/sha256/...`, and a `manifest.json` whose paths point into `blobs/`."""
    files: dict[str, bytes] = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}'}
    manifest = []
    index = []

    def blob(data: bytes) -> tuple[str, str]:
        digest = hashlib.sha256(data).hexdigest()
        files[f"blobs/sha256/{digest}"] = data
        return f"sha256:{digest}", f"blobs/sha256/{digest}"

    for tag, layers in images.items():
        described = [(*blob(layer), len(layer)) for layer in layers]
        config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {"Labels": {"tag": tag}},
                "rootfs": {"type": "layers", "diff_ids": [d for d, _, _ in described]},
            }
        ).encode()
        config_digest, config_path = blob(config)
        image_manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": config_digest,
                    "size": len(config),
                },
                "layers": [
                    {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": n}
                    for d, _, n in described
                ],
            }
        ).encode()
        manifest_digest, _ = blob(image_manifest)
        index.append(
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": len(image_manifest),
                "annotations": {"io.containerd.image.name": f"docker.io/{tag}"},
            }
        )
        manifest.append(
            {"Config": config_path, "RepoTags": [tag], "Layers": [p for _, p, _ in described]}
        )
    files["index.json"] = json.dumps({"schemaVersion": 2, "manifests": index}).encode()
    files["manifest.json"] = json.dumps(manifest).encode()
    return tar_of(files)


def legacy_save(images: dict[str, list[bytes]], diff_ids_lie: bool = False) -> bytes:
    """A `docker save` tar in the legacy layout (Docker <= 24): `<id>/layer.tar`,
    `<config digest>.json` and `manifest.json`, for images tagged by the keys. With
    `diff_ids_lie`, each config names digests its layers do not have: Docker refuses it."""
    files: dict[str, bytes] = {}
    manifest = []
    for tag, layers in images.items():
        diff_ids = ["sha256:" + hashlib.sha256(layer).hexdigest() for layer in layers]
        paths = []
        for layer, diff_id in zip(layers, diff_ids, strict=True):
            path = diff_id.removeprefix("sha256:") + "/layer.tar"
            files[path] = layer
            paths.append(path)
        if diff_ids_lie:
            diff_ids = ["sha256:" + hashlib.sha256(d.encode()).hexdigest() for d in diff_ids]
        config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {"Labels": {"tag": tag}},
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
            }
        ).encode()
        config_name = hashlib.sha256(config).hexdigest() + ".json"
        files[config_name] = config
        manifest.append({"Config": config_name, "RepoTags": [tag], "Layers": paths})
    files["manifest.json"] = json.dumps(manifest).encode()
    return tar_of(files)
