"""A private Podman service for tests: `podman system service` on a socket of its own, with
its own storage and temporary folder. It serves Podman's Docker-compatible API; no
container is ever run, so it sets up no network."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from tests.dockerd import ping
from tests.polling import poll


class PodmanError(RuntimeError):
    pass


class PrivatePodman:
    def __init__(
        self, start_timeout: float = 30.0, tmp_size: str | None = None, driver: str = "vfs"
    ) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="azl-pm-", dir="/tmp"))
        self.socket = self.root / "api.sock"
        # Where Podman spools a load (its TMPDIR): /var/tmp by default.
        self.tmp = self.root / "tmp"
        self.log_path = self.root / "podman.log"
        self.start_timeout = start_timeout
        # A tmpfs of this size (e.g. "16m") as its temporary folder: a small disk.
        self.tmp_size = tmp_size
        # vfs works anywhere (nested, any filesystem); overlay is what devices use.
        self.driver = driver
        self._proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> str | None:
        if os.geteuid() != 0:
            return "a private Podman service needs root here"
        if shutil.which("podman") is None:
            return "no podman binary (install podman)"
        return None

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    def options(self) -> list[str]:
        """What every podman command on this service's storage takes."""
        return [
            f"--root={self.root / 'storage'}",
            f"--runroot={self.root / 'run'}",
            f"--storage-driver={self.driver}",
            "--cgroup-manager=cgroupfs",
            "--events-backend=file",
        ]

    def command(self) -> list[str]:
        return ["podman", *self.options(), "system", "service", "--time=0", self.host]

    def start(self) -> PrivatePodman:
        self.tmp.mkdir(parents=True, exist_ok=True)
        if self.tmp_size is not None:
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={self.tmp_size}", "tmpfs", str(self.tmp)],
                check=True,
            )
        env = {**os.environ, "TMPDIR": str(self.tmp)}
        env.pop("DOCKER_HOST", None)
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
        if proc.poll() is not None or not ready:
            self.stop()
            raise PodmanError(f"podman system service did not serve:\n{self.log()}")
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        # vfs layers are plain folders; a mount may linger only if a container ran.
        for mounted in (self.root / "storage", self.tmp):
            subprocess.run(
                ["umount", "-R", "-l", str(mounted)], check=False, stderr=subprocess.DEVNULL
            )
        shutil.rmtree(self.root, ignore_errors=True)
