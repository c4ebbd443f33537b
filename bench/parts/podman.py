"""Row 1d: the unlock into Podman (its Docker-compatible API) against `podman load -i` of the
same plaintext, on a private Podman service with the overlay driver, as devices run it."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

from bench.client import drive_unlock
from bench.fixtures import EMAIL, PASSWORD, Archive, Bench
from bench.harness import MB, BenchError, Sampler, Spread, tree_bytes, warm
from bench.results import PartResult, Row, ratio, runs
from loader.images import Docker
from tests.podman import PodmanError, PrivatePodman

STATUS_EVERY = 0.05
DISK_EVERY = 0.1


class BenchPodman(PrivatePodman):
    """A private Podman service that also dies if the bench is killed outright."""

    def command(self) -> list[str]:
        prefix = ["setpriv", "--pdeathsig", "TERM"] if shutil.which("setpriv") else []
        return [*prefix, *super().command()]


@contextmanager
def _podman() -> Iterator[BenchPodman]:
    reason = PrivatePodman.available()
    if reason:
        raise BenchError(f"cannot run a private Podman service: {reason}")
    service = BenchPodman(driver="overlay")
    try:
        service.start()
    except PodmanError as exc:
        raise BenchError(str(exc)) from None
    try:
        yield service
    finally:
        service.stop()


def _removed(engine: Docker, archive: Archive) -> None:
    engine.remove(list(engine.inspect(archive.tags)))
    if engine.inspect(archive.tags):
        raise BenchError("the images are still in Podman after removing them")


def _loaded(engine: Docker, archive: Archive, who: str) -> None:
    have = sorted(engine.inspect(archive.tags))
    if have != sorted(archive.tags):
        raise BenchError(f"after {who}, Podman has {have}, not {archive.tags}")


def _podman_load(service: BenchPodman, archive: Archive) -> float:
    command = ["podman", *service.options(), "load", "-q", "-i", str(archive.plain)]
    env = {**os.environ, "TMPDIR": str(service.tmp)}
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise BenchError(f"podman load -i failed ({done.returncode}): {done.stderr.strip()}")
    return wall


def unlock_podman(bench: Bench) -> PartResult:
    """Row 1d: unlocks and `podman load -i`, alternating, images removed before each."""
    archive = bench.archive()
    bench.emulator_url()
    warm(archive.path, archive.plain)
    floors: list[float] = []
    walls: list[float] = []
    tmp_peaks: list[float] = []
    floor_tmp_peaks: list[float] = []
    with _podman() as service:
        engine = Docker(service.host)
        try:
            for index in range(bench.runs):
                for step in ("floor", "loader") if index % 2 == 0 else ("loader", "floor"):
                    _removed(engine, archive)
                    if step == "floor":
                        bench.settle()
                        with Sampler(lambda: tree_bytes(service.tmp), DISK_EVERY) as tmp:
                            floors.append(_podman_load(service, archive))
                        floor_tmp_peaks.append(max(tmp.values(), default=0) / MB)
                        _loaded(engine, archive, "podman load -i")
                        print(f"  podman load -i: {floors[-1]:.2f} s")
                        continue
                    daemon = bench.daemon(docker_host=service.host)
                    try:
                        bench.settle()
                        with Sampler(lambda: tree_bytes(service.tmp), DISK_EVERY) as tmp:
                            run = asyncio.run(
                                drive_unlock(daemon.socket, EMAIL, PASSWORD, STATUS_EVERY)
                            )
                    finally:
                        daemon.stop()
                    if run.status.get("state") != "ready":
                        raise BenchError(f"the unlock into Podman ended {run.status}")
                    walls.append(run.wall)
                    tmp_peaks.append(max(tmp.values(), default=0) / MB)
                    _loaded(engine, archive, "the unlock")
                    print(f"  unlock into Podman: {walls[-1]:.2f} s")
        finally:
            engine.close()
    wall, floor = Spread.of(walls), Spread.of(floors)
    tmp_peak, floor_tmp = Spread.of(tmp_peaks), Spread.of(floor_tmp_peaks)
    result = PartResult()
    result.rows += [
        Row(
            "1d",
            "unlock into Podman 4.3 (Docker-compatible API): POST /unlock to state ready",
            wall.fmt("s", 2),
            f"podman load -i: {floor.fmt('s', 2)}",
            ratio(wall, floor),
            "<= 1.20x",
            wall.median / floor.median <= 1.20,
            f"unlock {runs(wall, 2)} s; podman load -i {runs(floor, 2)} s",
        ),
        Row(
            "1e",
            "unlock into Podman: peak of Podman's temporary folder",
            tmp_peak.fmt("MB", 0),
            f"podman load -i: {floor_tmp.fmt('MB', 0)}",
            ratio(tmp_peak, floor_tmp),
            runs=f"unlock {runs(tmp_peak, 0)} MB; podman load -i {runs(floor_tmp, 0)} MB",
        ),
    ]
    result.notes.append(
        f"Rows 1d, 1e: {len(walls)} unlocks and {len(floors)} `podman load -i` of the same "
        f"{archive.plaintext_size / MB:,.0f} MB plaintext, alternating, into a private "
        "`podman system service` (overlay driver, its own storage and TMPDIR), every image "
        "removed before every run, a fresh daemon per unlock."
    )
    return result
