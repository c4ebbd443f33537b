"""The stack's Docker images, through the Docker SDK: the only module that imports `docker`.

Every call here blocks: callers run them off the event loop. The SDK (and requests under
it) is imported on first use: an idle daemon never needs it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from loader.errors import DockerFailed, DockerUnavailable

log = logging.getLogger(__name__)

# resource-api.md, "The image archive": what the archive holds, each tagged <name>:<API_VERSION>.
STACK_IMAGES = (
    "azaion/annotations",
    "azaion/flights",
    "azaion/detections",
    "azaion/gps-denied-onboard",
    "azaion/gps-denied-desktop",
    "azaion/autopilot",
    "azaion/ai-training",
)
# Quick calls (inspect, info, remove). Loads have no read timeout at all: Docker is
# silent while it registers a layer, for a second or more per 250 MB.
QUICK_TIMEOUT = 30
# The oldest API the calls here need (Docker 1.13); the engine's own is used once known.
MIN_API = "1.25"
# The SDK's default when DOCKER_HOST is unset.
DEFAULT_HOST = "unix:///var/run/docker.sock"
# Docker spools each image's tar to its data root, then unpacks its layers beside it: it
# needs the layers it lacks, plus the largest image's tar at once, plus room to spare.
SPACE_MARGIN = 256 * 1000**2


def stack_tags(version: str) -> list[str]:
    return [f"{name}:{version}" for name in STACK_IMAGES]


@dataclass(frozen=True)
class EngineImage:
    """An image as the engine has it: its ID, its layers' diff IDs from the base up, and
    whether it is whole.

    Docker's containerd store keeps under its tag an image that a load left incomplete (a
    refused load, or a thin one whose layers it holds under other digests): inspect finds
    it, the image list leaves it out. Its layers are not all there, so none are given.
    """

    id: str
    layers: tuple[str, ...]
    whole: bool = True


@dataclass(frozen=True)
class Spool:
    """A folder the engine writes into during a load, and the bytes free on its filesystem."""

    role: str  # "data root", "temporary folder"
    path: str
    free: int
    device: int  # st_dev: two folders on one filesystem share its free space


class Docker:
    """The engine through the Docker SDK: a client for quick calls, and one per load."""

    def __init__(self, host: str | None) -> None:
        self._host = host
        self._lock = threading.Lock()
        self._quick: Any = None
        self._version: str | None = None
        # What the engine at DOCKER_HOST calls itself, once it has answered: errors name it.
        self.name = "Docker"

    def _client(self) -> Any:
        """The client for quick calls. Built on first use: the daemon may start before the
        engine does."""
        self._probe()
        with self._lock:
            if self._quick is None:
                import docker

                self._quick = docker.APIClient(
                    base_url=self._host, version=self._api_version(), timeout=QUICK_TIMEOUT
                )
            return self._quick

    def _load_client(self) -> Any:
        """A client of its own for one load, without a read timeout: loads may run side by
        side, and a failure that closes the quick client leaves the others alone."""
        self._probe()
        with self._lock:
            version = self._api_version()
        import docker

        return docker.APIClient(base_url=self._host, version=version, timeout=None)

    def _api_version(self) -> str:
        """The engine's API version, asked once (GET /version) for both clients, and its
        name with it: Podman answers /version in 0.4 s, which the SDK's version="auto" and
        a second question would pay three times an unlock. Under self._lock."""
        if self._version is None:
            answer = self._ask_version()
            self._version = str(answer.get("ApiVersion") or MIN_API)
            self.name = _engine_name(answer)
        return self._version

    def _ask_version(self) -> dict[str, Any]:
        import docker
        import docker.errors
        import requests.exceptions

        probe = docker.APIClient(base_url=self._host, version=MIN_API, timeout=QUICK_TIMEOUT)
        try:
            return dict(probe.version(api_version=False))
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise DockerUnavailable(f"cannot reach the container engine: {_reason(exc)}") from None
        finally:
            probe.close()

    def describe(self) -> str:
        """The engine as it answers now, e.g. "Docker 20.10.24 (API 1.41) at /run/docker.sock",
        asked afresh: a cached answer would hide an engine that has since stopped."""
        self._probe()
        answer = self._ask_version()
        name = _engine_name(answer)
        host = self._host or DEFAULT_HOST
        where = host.removeprefix("unix://")
        return (
            f"{name} {answer.get('Version', '?')} (API {answer.get('ApiVersion', '?')}) at {where}"
        )

    def _probe(self) -> None:
        """Connect to a local engine's socket first: a clear error when Docker is down, and
        no socket left open by the SDK, which leaks the one whose connect() fails."""
        host = self._host or DEFAULT_HOST
        if not host.startswith("unix://"):
            return
        path = host[len("unix://") :]
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(QUICK_TIMEOUT)
            probe.connect(path)
        except OSError as exc:
            raise DockerUnavailable(
                f"cannot reach the container engine at {path}: {exc.strerror or exc} (is the "
                "engine DOCKER_HOST names running: docker.service, or podman.socket?)"
            ) from None
        finally:
            probe.close()

    def close(self) -> None:
        with self._lock:
            if self._quick is not None:
                self._quick.close()
            self._quick = None
            self._version = None  # the engine may come back another version, or another one

    @contextmanager
    def _calling(self, doing: str) -> Iterator[None]:
        """Our errors for the SDK's, naming what we were doing. After a failure the clients
        are closed, so that no half-used connection lingers; the next call makes new ones."""
        import docker.errors
        import requests.exceptions

        try:
            yield
        except BaseException as exc:
            self.close()
            if isinstance(exc, requests.exceptions.ConnectionError):
                raise DockerUnavailable(
                    f"lost {self.name} while trying to {doing}: {_reason(exc)}"
                ) from exc
            if isinstance(exc, docker.errors.APIError):
                raise DockerFailed(
                    f"{self.name} refused to {doing}: {exc.explanation or exc}"
                ) from exc
            if isinstance(
                exc, (docker.errors.DockerException, requests.exceptions.RequestException)
            ):
                raise DockerUnavailable(f"cannot {doing} with {self.name}: {_reason(exc)}") from exc
            raise

    def missing(self, tags: Iterable[str]) -> list[str]:
        """Those of `tags` that Docker does not have whole."""
        tags = list(tags)
        held = self.inspect(tags)
        return [tag for tag in tags if tag not in held or not held[tag].whole]

    def inspect(self, tags: Iterable[str]) -> dict[str, EngineImage]:
        """Those of `tags` that Docker has: each image's ID, layers, and whether it is whole
        (in the image list)."""
        import docker.errors

        api = self._client()
        found = {}
        with self._calling("inspect the images"):
            for tag in tags:
                try:
                    answer = api.inspect_image(tag)
                except docker.errors.ImageNotFound:
                    continue
                layers = (answer.get("RootFS") or {}).get("Layers") or ()
                found[tag] = EngineImage(_digest(str(answer.get("Id", ""))), tuple(layers))
        listed = self.listed() if found else set()
        return {
            tag: image if image.id in listed else EngineImage(image.id, (), whole=False)
            for tag, image in found.items()
        }

    def listed(self) -> set[str]:
        """The IDs in the engine's image list ("sha256:..."). Docker's containerd store
        leaves out an image it holds incompletely, which inspect still answers."""
        with self._calling("list the images"):
            listed = self._client().images()
        return {_digest(str(image.get("Id", ""))) for image in listed}

    def spools(self) -> list[Spool]:
        """Where the engine writes what it loads, as this process sees those folders: Docker's
        data root; Podman's storage and the folder it spools a load into (its
        imageCopyTmpDir, /var/tmp unless its TMPDIR says otherwise). A folder that cannot be
        seen from here (another mount namespace, a remote engine) is left out."""
        api = self._client()
        with self._calling("read where the engine keeps its images"):
            root = api.info().get("DockerRootDir")
            places = [("data root", root)] if root else []
            if self.name == "Podman":
                store = api._result(api._get(api._url("/libpod/info")), json=True).get("store")
                tmp = (store or {}).get("imageCopyTmpDir") or "/var/tmp"
                places.append(("temporary folder", tmp))
        spools = []
        for role, path in places:
            try:
                stats = os.statvfs(path)
                device = os.stat(path).st_dev
            except OSError:
                continue
            spools.append(Spool(role, str(path), stats.f_bavail * stats.f_frsize, device))
        return spools

    def remove(self, tags: Iterable[str]) -> None:
        """Remove tags, best effort: an image that came out of a load with another ID than
        the archive's is not left under a stack tag."""
        import docker.errors
        import requests.exceptions

        api = self._client()
        for tag in tags:
            try:
                api.remove_image(tag)
                log.info("removed %s from the engine", tag)
            except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
                log.warning("could not remove %s from the engine: %s", tag, _reason(exc))

    def load(self, tar: Iterator[bytes]) -> None:
        """Stream a `docker save` tarball into the engine.

        Docker answers 200 and reports failures inside its stream, so every message is read.
        """
        api = self._load_client()
        with contextlib.closing(api), self._calling("load the images"):
            # The SDK's load_image() leaves its response open when we stop reading early;
            # its own building blocks (stable since docker-py 1.x) let us close it.
            response = api._post(
                api._url("/images/load"), data=tar, params={"quiet": False}, stream=True
            )
            with contextlib.closing(response):
                api._raise_for_status(response)
                for message in api._stream_helper(response, decode=True):
                    error = _message_error(message)
                    if error:
                        raise DockerFailed(f"{self.name} refused the images: {error}")


def space_shortfall(
    engine: str, spools: list[Spool], layers: int, largest: int, podman_spool: int
) -> str | None:
    """Why the engine lacks room for a load, or None: the layers it will keep plus what it
    spools while it loads. Docker spools the image's tar in its data root (`largest` bytes
    at once); Podman keeps the layers in its data root and spools `podman_spool` bytes in its
    temporary folder. Folders on one filesystem share its free space."""
    podman = engine == "Podman"
    needs: dict[int, int] = {}
    why: dict[int, list[str]] = {}
    for spool in spools:
        if spool.role == "data root":
            need = layers if podman else layers + largest
            what = f"{gigabytes(layers)} of images" + ("" if podman else " spooled one by one")
        else:
            need = podman_spool
            what = f"{gigabytes(need)} of images spooled, unpacked and staged"
        needs[spool.device] = needs.get(spool.device, SPACE_MARGIN) + need
        why.setdefault(spool.device, []).append(f"{what} under {spool.path}")
    for spool in spools:
        if spool.device in needs and spool.free < needs[spool.device]:
            return (
                f"{engine} needs about {gigabytes(needs[spool.device])} free on the filesystem of "
                f"{spool.path} ({'; '.join(why[spool.device])}), but only {gigabytes(spool.free)} "
                "is free"
            )
        needs.pop(spool.device, None)
    return None


def gigabytes(size: int) -> str:
    return f"{size / 1e9:.1f} GB"


def _digest(image_id: str) -> str:
    return image_id if image_id.startswith("sha256:") else f"sha256:{image_id}"


def _engine_name(version: dict[str, Any]) -> str:
    """The engine's name for messages, from its /version: Podman for Podman's
    Docker-compatible API."""
    components = version.get("Components")
    names = " ".join(
        str(component.get("Name", ""))
        for component in (components if isinstance(components, list) else ())
        if isinstance(component, dict)
    )
    return "Podman" if "Podman" in names else "Docker"


def _message_error(message: Any) -> str | None:
    if not isinstance(message, dict):
        return None
    detail = message.get("errorDetail")
    if isinstance(detail, dict) and detail.get("message"):
        return str(detail["message"])
    if message.get("error"):
        return str(message["error"])
    # An HTTP error answer decoded as a stream message.
    if message.get("message") and not ({"stream", "status"} & message.keys()):
        return str(message["message"])
    return None


def _reason(exc: BaseException) -> str:
    # requests nests the cause: ('Connection aborted.', FileNotFoundError(2, ...)).
    text = str(exc)
    return text if len(text) < 300 else text[:300] + "..."
