"""Docker 26.1 (Debian 13's docker.io) for tests on a Debian 12 host: a trixie root booted
under systemd-nspawn with a network of its own, its dockerd serving on a socket in a host
folder bound in, so that the loader under test runs on the host and talks to Docker 26.

    with BootedDocker26() as docker26:
        docker26.use_store(containerd=True)
        Docker(docker26.host)...

The root comes from `scripts/debian-root --suite trixie --with-docker`, cached under
AZAION_TEST_CACHE. Its daemon.json keeps dockerd off any network (no bridge, no iptables,
no forwarding), and the container has only its own loopback: a dockerd in the host's
network namespace rewrites the host's firewall and routes. No container is ever run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import docker

from tests.dockerd import mounts_under, ping
from tests.polling import poll
from tests.system.machine import Machine, MachineError

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("AZAION_TEST_CACHE", "/var/cache/azaion-loader-tests"))
# Where the host's short folder appears inside; dockerd makes its socket there.
DOCKER_DIR = "/run/azl-docker"
UNIT = "azl-dockerd.service"
DAEMON_JSON = "etc/docker/daemon.json"
# Like Debian's docker.service (Type=notify, the system containerd, KillMode=process), but
# on the bound folder's socket, without docker.socket, and not restarted when killed.
UNIT_TEXT = f"""\
# dockerd for the loader's tests: serves on {DOCKER_DIR}/docker.sock, which the host sees.
[Unit]
Description=Docker Application Container Engine, for the host's tests
Wants=containerd.service
After=containerd.service

[Service]
Type=notify
ExecStart=/usr/sbin/dockerd --host=unix://{DOCKER_DIR}/docker.sock \
--containerd=/run/containerd/containerd.sock
TimeoutStartSec=60
Restart=no
Delegate=yes
KillMode=process
"""
# What a driver of each store calls itself in GET /info.
_CONTAINERD_DRIVER_TYPE = "io.containerd.snapshotter.v1"


class Docker26Error(RuntimeError):
    """The root could not be made, the container did not boot, or dockerd did not serve."""


class BootedDocker26:
    """A booted Debian 13 whose dockerd the host reaches at `host`; `start`, then `stop`.

    `timings` records, in seconds, making the root ("root": a copy of the cached one, or
    debootstrap and install when uncached), the boot, and dockerd's first start.
    """

    def __init__(self, start_timeout: float = 60.0) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="azl-d26-", dir="/var/tmp"))
        self.root = self.work / "root"
        # Short: Unix socket paths are limited to 107 bytes.
        self.short = Path(tempfile.mkdtemp(prefix="azl-d26-", dir="/tmp"))
        self.socket = self.short / "docker.sock"
        self.start_timeout = start_timeout
        self.timings: dict[str, float] = {}
        self.containerd_store = False
        self.machine = Machine(
            self.root,
            self.work / "nspawn.log",
            binds=[f"{self.short}:{DOCKER_DIR}"],
            nspawn_args=["--private-network"],
            # Debian 13's systemd (257) runs only on cgroup v2.
            nspawn_env={"SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"},
        )

    @staticmethod
    def available() -> str | None:
        """Why Docker 26 cannot be booted here, or None when it can."""
        if os.geteuid() != 0:
            return "booting Debian 13 under systemd-nspawn needs root"
        for tool in ("systemd-nspawn", "debootstrap", "nsenter"):
            if shutil.which(tool) is None:
                return f"{tool} is not installed"
        return None

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> BootedDocker26:
        """Make the root, boot it, start dockerd (default store) and wait until it answers."""
        began = time.monotonic()
        self._make_root()
        self.timings["root"] = time.monotonic() - began
        unit = self.root / "etc/systemd/system" / UNIT
        unit.write_text(UNIT_TEXT)
        began = time.monotonic()
        try:
            self.machine.boot()
        except MachineError as exc:
            raise Docker26Error(f"Debian 13 did not boot: {exc}") from None
        self.timings["boot"] = time.monotonic() - began
        self._check_own_network()
        began = time.monotonic()
        self.start_engine()
        self.timings["engine"] = time.monotonic() - began
        return self

    def _make_root(self) -> None:
        log = self.work / "debian-root.log"
        with open(log, "wb") as out:
            made = subprocess.run(
                [
                    REPO / "scripts" / "debian-root",
                    "--cache",
                    CACHE,
                    "--suite",
                    "trixie",
                    "--with-docker",
                    self.root,
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
            )
        if made.returncode != 0:
            tail = log.read_bytes()[-3000:].decode(errors="replace")
            raise Docker26Error(f"scripts/debian-root failed with {made.returncode}:\n{tail}")

    def _check_own_network(self) -> None:
        """Refuse to go on unless the container has a network namespace of its own."""
        inside = os.readlink(f"/proc/{self.machine.leader}/ns/net")
        if inside == os.readlink("/proc/self/ns/net"):
            raise Docker26Error("the container shares the host's network: dockerd not started")

    def start_engine(self) -> None:
        """Start dockerd inside (after `kill_engine`, too) and wait until the host reaches it."""
        result = self.machine.run("systemctl", "start", UNIT, check=False)
        if result.returncode != 0 or not poll(lambda: ping(self.socket), self.start_timeout):
            raise Docker26Error(f"dockerd did not serve:\n{self.journal()}")

    def kill_engine(self) -> None:
        """SIGKILL dockerd, as a crash would; containerd, a service of its own, lives on."""
        self.machine.run("systemctl", "kill", "--kill-whom=main", "--signal=SIGKILL", UNIT)
        self.machine.wait_for(
            "dockerd to die",
            lambda: (
                self.machine.run("systemctl", "is-active", UNIT, check=False).stdout.strip()
                in ("failed", "inactive")
            ),
            timeout=self.start_timeout,
        )

    def use_store(self, containerd: bool) -> None:
        """Docker's image store: the graphdriver one (overlay2, the default) or containerd's
        (`"features": {"containerd-snapshotter": true}`). dockerd restarts on a change; the
        images of each store stay in it."""
        if containerd == self.containerd_store and ping(self.socket):
            return
        path = self.root / DAEMON_JSON
        config: dict[str, Any] = json.loads(path.read_text())
        features = config.setdefault("features", {})
        features["containerd-snapshotter"] = containerd
        path.write_text(json.dumps(config, indent=2) + "\n")
        self.machine.run("systemctl", "stop", UNIT)
        self.start_engine()
        driver_type = self.driver_type()
        if (driver_type == _CONTAINERD_DRIVER_TYPE) != containerd:
            raise Docker26Error(f"dockerd restarted with the wrong store: {driver_type!r}")
        self.containerd_store = containerd

    def driver_type(self) -> str:
        """GET /info's storage driver type: the containerd snapshotter or a graphdriver."""
        api = docker.APIClient(base_url=self.host, version="auto", timeout=30)
        try:
            info = api.info()
        finally:
            api.close()
        status = dict(info.get("DriverStatus") or [])
        return str(status.get("driver-type") or f"graphdriver {info.get('Driver')}")

    def journal(self, lines: int = 40) -> str:
        try:
            return self.machine.journal(UNIT, lines)
        except MachineError as exc:
            return str(exc)

    def stop(self) -> None:
        """Power the container off, then remove the root and the host folder."""
        self.machine.shutdown()
        # nspawn mounts in a namespace of its own; anything seen here is a leftover.
        for point in mounts_under(self.work, self.short):
            subprocess.run(["umount", "-l", point], check=False, stderr=subprocess.DEVNULL)
        if left := mounts_under(self.work, self.short):
            raise Docker26Error(f"mounts left behind: {left}")
        shutil.rmtree(self.work, ignore_errors=True)
        shutil.rmtree(self.short, ignore_errors=True)

    def __enter__(self) -> BootedDocker26:
        try:
            return self.start()
        except BaseException:
            with contextlib.suppress(Docker26Error):
                self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
