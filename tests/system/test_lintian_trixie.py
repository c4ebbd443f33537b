"""lintian of Debian 13 ("trixie") on the .deb built here on Debian 12.

trixie's lintian knows what bookworm's does not: /lib is an alias of /usr/lib there, so a
file shipped under /lib is an error (aliased-location), and an override naming a tag it no
longer has is an error too (alien-tag). It runs in a chroot of a trixie root from
`scripts/debian-root` (cached; the flavour with docker.io that the booted trixie tests
use, so the session debootstraps once), with lintian installed from the mirror.
About a minute: apt installing lintian is most of it, the build runs alongside.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import skip_or_fail
from tests.system.conftest import CACHE, REPO

pytestmark = pytest.mark.system

APT_ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}


def _run(*args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(arg) for arg in args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        env=APT_ENV,
        stdin=subprocess.DEVNULL,
    )


def _install_lintian(root: Path) -> None:
    install = ("chroot", root, "apt-get", "install", "-y", "-q", "--no-install-recommends")
    if _run(*install, "lintian").returncode == 0:
        return
    # The cached root's package lists may be older than the archive.
    update = _run("chroot", root, "apt-get", "update", "-q")
    result = _run(*install, "lintian")
    if result.returncode != 0:
        said = (update.stdout + update.stderr + result.stdout + result.stderr)[-3000:]
        skip_or_fail(f"apt-get could not install lintian in the trixie root:\n{said}")


def test_trixies_lintian_finds_no_error_or_warning(work_dir: Path) -> None:
    if shutil.which("chroot") is None or shutil.which("unshare") is None:
        skip_or_fail("chroot and unshare are needed")
    started = time.monotonic()
    root = work_dir / "trixie-lintian"
    out = work_dir / "trixie-lintian-debs"
    build_log = work_dir / "trixie-lintian-build.log"
    with open(build_log, "wb") as log:
        build = subprocess.Popen(
            [REPO / "scripts" / "build-deb", "--out", out, "--no-lintian"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        made = _run(
            REPO / "scripts" / "debian-root",
            "--cache",
            CACHE,
            "--suite",
            "trixie",
            "--with-docker",
            root,
        )
        assert made.returncode == 0, (made.stdout + made.stderr)[-3000:]
        rooted = time.monotonic()
        _install_lintian(root)
        installed = time.monotonic()
    finally:
        build.wait()
    assert build.returncode == 0, build_log.read_text(errors="replace")[-3000:]
    inside = root / "root" / "lintian"
    inside.mkdir(parents=True)
    for built in out.iterdir():
        if built.suffix in (".deb", ".changes", ".buildinfo"):
            shutil.copy(built, inside)
    changes = next(inside.glob("azaion-loader_*.changes")).name
    # /proc in a mount namespace of its own: gone when lintian ends, whatever happens.
    script = (
        'mount -t proc proc "$0/proc" && exec chroot "$0" sh -c '
        '"cd /root/lintian && lintian --version && '
        'lintian -I -E --pedantic --fail-on error,warning $1"'
    )
    result = _run("unshare", "--mount", "--fork", "sh", "-c", script, root, changes)
    ended = time.monotonic()
    print(
        f"trixie lintian: root {rooted - started:.1f} s, lintian installed "
        f"{installed - rooted:.1f} s, lintian ran {ended - installed:.1f} s, "
        f"in all {ended - started:.1f} s; {result.stdout.splitlines()[:1]}"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Lintian v2.1" in result.stdout, result.stdout
