"""A Debian root booted under systemd-nspawn; commands run inside it through nsenter."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from tests.polling import poll

# What a command inside gets instead of the caller's environment (a pyenv PATH, LISTEN_*).
_BASE_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
}


class MachineError(Exception):
    """The container did not boot, or a command inside it failed."""


class Machine:
    """`systemd-nspawn -b` on `root`, in the host's network unless `nspawn_args` (extra
    arguments) give it its own; `binds` are extra `--bind=` values.

    `setenv` goes to the container's init (`--setenv=`); `env` to every command run inside;
    `nspawn_env` to systemd-nspawn itself (e.g. SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 for a
    systemd that needs cgroup v2, on a host with the hybrid hierarchy).
    """

    def __init__(
        self,
        root: Path,
        log_path: Path,
        *,
        binds: Sequence[str] = (),
        setenv: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
        nspawn_args: Sequence[str] = (),
        nspawn_env: Mapping[str, str] | None = None,
    ) -> None:
        self.root = root
        self.log_path = log_path
        self.binds = tuple(binds)
        self.setenv = dict(setenv or {})
        self.env = {**_BASE_ENV, **(env or {})}
        self.nspawn_args = tuple(nspawn_args)
        self.nspawn_env = dict(nspawn_env or {})
        self.leader: int | None = None
        self._nspawn: subprocess.Popen[bytes] | None = None

    def boot(self, timeout: float = 90.0) -> None:
        """Start the container and wait until its systemd says the system is up."""
        command = [
            "systemd-nspawn",
            "--quiet",
            f"--directory={self.root}",
            "--boot",
            "--register=no",
            "--keep-unit",
            # No private network: the host's, so apt and the daemon reach the internet.
            "--resolv-conf=copy-host",
            "--console=passive",
            *(f"--bind={bind}" for bind in self.binds),
            *(f"--setenv={name}={value}" for name, value in self.setenv.items()),
            *self.nspawn_args,
        ]
        with open(self.log_path, "ab") as log:
            self._nspawn = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **self.nspawn_env},
            )
        deadline = time.monotonic() + timeout
        self.leader = self._find_leader(deadline)
        state = ""
        while time.monotonic() < deadline:
            result = self.run(
                "systemctl",
                "is-system-running",
                "--wait",
                check=False,
                timeout=max(1.0, deadline - time.monotonic()),
            )
            state = result.stdout.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.2)
        raise MachineError(f"the container did not finish booting in {timeout} s (state {state!r})")

    def _find_leader(self, deadline: float) -> int:
        """The container's PID 1, as the host numbers it: nspawn's child that is 1 inside."""
        assert self._nspawn is not None
        while time.monotonic() < deadline:
            if self._nspawn.poll() is not None:
                raise MachineError(
                    f"systemd-nspawn exited with {self._nspawn.returncode}: {self.log_tail()}"
                )
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    status = (entry / "status").read_text()
                except OSError:
                    continue
                fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
                if fields.get("PPid", "").strip() == str(self._nspawn.pid) and fields.get(
                    "NSpid", ""
                ).split()[-1:] == ["1"]:
                    return int(entry.name)
            time.sleep(0.05)
        raise MachineError("the container's init did not appear")

    def run(
        self,
        *args: str,
        check: bool = True,
        input: str | None = None,
        timeout: float = 120.0,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in all of the container's namespaces, with a clean environment."""
        if self.leader is None:
            raise MachineError("the container is not running")
        variables = [f"{k}={v}" for k, v in {**self.env, **(env or {})}.items()]
        command = ["nsenter", f"--target={self.leader}", "--all", "env", "-i", *variables, *args]
        try:
            result = subprocess.run(
                command,
                input=input,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise MachineError(f"{' '.join(args)}: no answer in {timeout} s") from exc
        if check and result.returncode != 0:
            raise MachineError(
                f"{' '.join(args)} exited with {result.returncode}:\n"
                f"{result.stdout[-3000:]}{result.stderr[-3000:]}"
            )
        return result

    def write(self, path: str, text: str, mode: str = "0644") -> None:
        """Write a file inside (also under /run and /tmp, which the host does not see)."""
        self.run("install", "-D", "-m", mode, "/dev/stdin", path, input=text)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        """`systemctl show` of `unit` as a dict."""
        out = self.run("systemctl", "show", unit, "-p", ",".join(properties)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str, lines: int = 40) -> str:
        return self.run(
            "journalctl", "--no-pager", "-u", unit, "-n", str(lines), check=False
        ).stdout

    def wait_for(self, what: str, condition: Callable[[], bool], timeout: float = 30.0) -> None:
        """Poll `condition` until it holds; fail after `timeout`."""
        if not poll(condition, timeout, interval=0.1):
            raise MachineError(f"timed out after {timeout} s waiting for {what}")

    def log_tail(self, size: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_bytes()[-size:].decode(errors="replace")
        return ""

    def shutdown(self, timeout: float = 30.0) -> None:
        """Power off; kill what is left after `timeout`. Safe after a failed boot, and twice."""
        nspawn = self._nspawn
        if nspawn is None:
            return
        if nspawn.poll() is None and self.leader is not None:
            # SIGRTMIN+4 asks systemd to power off, like `systemctl poweroff`.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.leader, signal.SIGRTMIN + 4)
            with contextlib.suppress(subprocess.TimeoutExpired):
                nspawn.wait(timeout)
        if nspawn.poll() is None:
            # Killing the container's init kills every process of its PID namespace.
            if self.leader is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.leader, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(nspawn.pid, signal.SIGKILL)
            nspawn.wait(10)
        self.leader = None
        self._nspawn = None
