"""Rows 1-3 (the unlock against `docker load -i`, its memory and its disk writes) and row 9
(/health latency while an unlock runs)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench.client import UnlockRun, drive_unlock
from bench.fixtures import EMAIL, PASSWORD, Archive, Bench, Daemon
from bench.harness import (
    MB,
    BenchError,
    Child,
    Sampler,
    Spread,
    files_open_for_writing,
    fs_used,
    percentile,
    tree_bytes,
    warm,
)
from bench.results import PartResult, Row, UnlockPicture, ratio, runs
from loader.archive import (
    EncryptedArchive,
    Image,
    image_tar,
    index_members,
    layers_present,
    read_images,
)
from tests.dockerd import present_images

STATUS_EVERY = 0.05
RSS_EVERY = 0.05
DISK_EVERY = 0.1
PROBE_EVERY = 0.01


@dataclass(frozen=True)
class DiskSample:
    """Bytes, at one moment."""

    used: int  # in use on the filesystems of the archive and of /tmp (statvfs, each once)
    beside: int  # under the archive's folder (Docker's own folder there left out)
    spool: int  # Docker's data root tmp/
    data_root: int  # Docker's whole data root


class DiskWatch:
    """Disk use beside the archive, on its filesystem and /tmp's, and in Docker's data root."""

    def __init__(self, archive_dir: Path, docker_root: Path, data_root: Path) -> None:
        self.archive_dir = archive_dir
        self.docker_root = docker_root
        self.data_root = data_root
        filesystems: dict[int, Path] = {}
        for path in (archive_dir, Path(tempfile.gettempdir())):
            filesystems.setdefault(os.stat(path).st_dev, path)
        self.filesystems = list(filesystems.values())
        self.shares_data_root = os.stat(data_root).st_dev in filesystems

    def sample(self) -> DiskSample:
        return DiskSample(
            used=sum(fs_used(path) for path in self.filesystems),
            beside=tree_bytes(self.archive_dir, exclude=self.docker_root),
            spool=tree_bytes(self.data_root / "tmp"),
            data_root=tree_bytes(self.data_root),
        )


@dataclass(frozen=True)
class DiskPeaks:
    """The largest growth over the baseline during a run, in MB."""

    used: float
    beside: float
    spool: float
    data_root: float

    @classmethod
    def of(cls, base: DiskSample, samples: list[DiskSample]) -> DiskPeaks:
        def peak(field: str) -> float:
            before = getattr(base, field)
            return max((getattr(s, field) - before for s in samples), default=0) / MB

        return cls(peak("used"), peak("beside"), peak("spool"), peak("data_root"))


@dataclass(frozen=True)
class FloorRun:
    wall: float
    disk: DiskPeaks


@dataclass(frozen=True)
class LoaderRun:
    run: UnlockRun
    peak_rss: float
    rss: list[tuple[float, float]]
    written: int
    writable_files: frozenset[str]
    disk: DiskPeaks


def image_sends(archive: Archive) -> list[tuple[str, Image, frozenset[str]]]:
    """What the unlock sends into an engine that has none of the stack, in its order: each
    tag, its image, and the digests of the layers left out (sent with an earlier image)."""
    with EncryptedArchive.open(archive.path, archive.key) as source:
        listed = read_images(source, index_members(source))
    images = {tag: image for image in listed for tag in image.tags}
    sends = []
    held: list[tuple[str, ...]] = []
    for tag in archive.tags:
        image = images[tag]
        sends.append((tag, image, frozenset(layers_present(image, held))))
        held.append(tuple(layer.digest for layer in image.layers))
    return sends


def largest_send(archive: Archive) -> tuple[str, int]:
    """The largest image the unlock sends into an empty engine, and its bytes: its config and
    the layers that image is the first to bring."""
    sizes = [
        (tag, image.size - sum(lay.member.size for lay in image.layers if lay.digest in present))
        for tag, image, present in image_sends(archive)
    ]
    return max(sizes, key=lambda each: each[1])


def _images_removed(bench: Bench, archive: Archive) -> None:
    bench.remove_images(archive.tags)
    if present_images(bench.dockerd(), archive.tags):
        raise BenchError("the images are still there after removing them")


def _check_loaded(bench: Bench, archive: Archive, who: str) -> None:
    have = present_images(bench.dockerd(), archive.tags)
    if have != archive.tags:
        raise BenchError(f"after {who}, Docker has {have}, not {archive.tags}")


def _floor_once(bench: Bench, archive: Archive, watch: DiskWatch) -> FloorRun:
    _images_removed(bench, archive)
    bench.settle()
    base = watch.sample()
    command = ["docker", "-H", bench.dockerd().host, "load", "-i", str(archive.plain)]
    with Sampler(watch.sample, DISK_EVERY) as disk:
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - started
    if done.returncode != 0:
        raise BenchError(f"docker load -i failed ({done.returncode}): {done.stderr.strip()}")
    _check_loaded(bench, archive, "docker load -i")
    return FloorRun(wall, DiskPeaks.of(base, disk.values()))


def _unlock(daemon: Daemon) -> UnlockRun:
    return asyncio.run(drive_unlock(daemon.socket, EMAIL, PASSWORD, STATUS_EVERY))


def _loader_once(bench: Bench, archive: Archive, watch: DiskWatch) -> LoaderRun:
    _images_removed(bench, archive)
    daemon = bench.daemon()
    try:
        bench.settle()
        base = watch.sample()
        written = daemon.written()

        def memory() -> tuple[float, list[str]]:
            return daemon.rss_mb(), files_open_for_writing(daemon.pid)

        with Sampler(memory, RSS_EVERY) as mem, Sampler(watch.sample, DISK_EVERY) as disk:
            run = _unlock(daemon)
        written = daemon.written() - written
        peak = daemon.peak_rss_mb()
    finally:
        daemon.stop()
    _check_loaded(bench, archive, "the unlock")
    return LoaderRun(
        run=run,
        peak_rss=peak,
        rss=[(t - run.started, rss) for t, (rss, _) in mem.samples],
        written=written,
        writable_files=frozenset(f for _, (_, files) in mem.samples for f in files),
        disk=DiskPeaks.of(base, disk.values()),
    )


def unlock(bench: Bench) -> PartResult:
    """Rows 1-3: the unlock and `docker load -i`, alternating, images removed before each."""
    archive = bench.archive()
    dockerd = bench.dockerd()
    bench.emulator_url()
    warm(archive.path, archive.plain)
    watch = DiskWatch(archive.path.parent, dockerd.root, dockerd.data_root)
    floors: list[FloorRun] = []
    loads: list[LoaderRun] = []
    for index in range(bench.runs):
        steps = ("floor", "loader") if index % 2 == 0 else ("loader", "floor")
        for step in steps:
            if step == "floor":
                floors.append(_floor_once(bench, archive, watch))
                print(f"  docker load -i: {floors[-1].wall:.2f} s")
            else:
                loads.append(_loader_once(bench, archive, watch))
                last = loads[-1]
                print(f"  unlock: {last.run.wall:.2f} s, peak RSS {last.peak_rss:.1f} MB")
    return _unlock_rows(archive, floors, loads, watch, largest_send(archive))


def _sent_at(run: UnlockRun) -> float:
    """When /unlock/status first showed the whole archive read (the body handed to Docker)."""
    total = int(run.status["bytesTotal"])
    return next((t for t, done, _ in run.trace if done >= total), run.wall)


def _progress_gap(run: UnlockRun) -> float:
    """The largest gap, in points, between `percent` and the share of the wall time gone."""
    if run.wall <= 0:
        return 0.0
    return max((abs(pct - 100 * t / run.wall) for t, pct in run.percents), default=0.0)


def _unlock_rows(
    archive: Archive,
    floors: list[FloorRun],
    loads: list[LoaderRun],
    watch: DiskWatch,
    largest_image: tuple[str, int],
) -> PartResult:
    largest_tag, largest = largest_image
    wall = Spread.of([r.run.wall for r in loads])
    floor = Spread.of([f.wall for f in floors])
    rss = Spread.of([r.peak_rss for r in loads])
    sent = Spread.of([_sent_at(r.run) for r in loads])
    gap = Spread.of([_progress_gap(r.run) for r in loads])
    result = PartResult()
    result.rows += [
        Row(
            "1",
            f"unlock, {archive.size / 2**30:.2f} GiB archive: POST /unlock to state ready",
            wall.fmt("s", 2),
            f"docker load -i: {floor.fmt('s', 2)}",
            ratio(wall, floor),
            "<= 1.00x",
            wall.median / floor.median <= 1.00,
            f"unlock {runs(wall, 2)} s; docker load -i {runs(floor, 2)} s; "
            f"whole archive read at {runs(sent, 2)} s",
        ),
        Row(
            "1b",
            "unlock: largest gap between /unlock/status percent and the share of wall time gone",
            gap.fmt("points"),
            target="<= 15 points",
            met=gap.hi <= 15,
            runs=f"{runs(gap)} points",
        ),
        Row(
            "2",
            "unlock: daemon peak RSS (VmHWM)",
            rss.fmt("MB"),
            target="< 80 MB",
            met=rss.hi < 80,
            runs=f"{runs(rss)} MB",
        ),
    ]
    result.rows += _disk_rows(floors, loads)
    spool = Spread.of([r.disk.spool for r in loads])
    floor_spool = Spread.of([f.disk.spool for f in floors])
    result.rows.append(
        Row(
            "3e",
            "unlock: peak of the engine's temporary space (data root tmp/)",
            spool.fmt("MB", 0),
            f"docker load -i: {floor_spool.fmt('MB', 0)}",
            ratio(spool, floor_spool),
            f"<= largest image's new layers + 10% ({1.1 * largest / MB:,.0f} MB)",
            spool.hi <= 1.1 * largest / MB,
            f"unlock {runs(spool, 0)} MB; docker load -i {runs(floor_spool, 0)} MB; the "
            f"largest image tar sent ({largest_tag}, the first to bring the shared base): "
            f"{largest / MB:,.0f} MB; the archive {archive.plaintext_size / MB:,.0f} MB",
        )
    )
    root = Spread.of([r.disk.data_root for r in loads] + [f.disk.data_root for f in floors])
    shared = "the filesystem that also holds Docker's data root" if watch.shares_data_root else ""
    result.notes += [
        f"Rows 1-3: {len(loads)} unlocks and {len(floors)} `docker load -i` of the same "
        f"{archive.plaintext_size / MB:,.0f} MB plaintext tar, alternating, every image "
        "removed before every run, files warm in the page cache, a fresh daemon per unlock. "
        f"The unlock's end is seen by polling /unlock/status every {STATUS_EVERY * 1000:.0f} ms "
        f"(so it reads up to that much late). The unlock had read the whole archive "
        f"(bytesDone = bytesTotal) at {sent.fmt('s', 2)}; the rest of its time is Docker "
        "registering the layers.",
        "Row 3 is the exact figure: the daemon's write_bytes in /proc/PID/io over the unlock "
        "(what it caused to be written to storage), and every regular file, deleted or not, "
        "it held open for writing (its /proc/PID/fd and fdinfo, sampled every "
        f"{RSS_EVERY * 1000:.0f} ms). Row 3b: du of the archive's folder "
        f"({watch.archive_dir}), Docker's folder in it left out. Row 3c: statvfs of "
        f"{' and '.join(str(p) for p in watch.filesystems)} ({shared}), sampled every "
        f"{DISK_EVERY * 1000:.0f} ms: it sees Docker's spool, hence the comparison with "
        "`docker load -i`; ext4 frees deleted blocks only at its next journal commit, "
        "which blurs it further.",
        f"Row 3d: Docker spools the whole tarball into its data root's tmp/ before it "
        f"registers the layers, whoever sends it, so a device needs about "
        f"{root.hi / 1000:.2f} GB free in Docker's data root to load this "
        f"{archive.plaintext_size / 1e9:.2f} GB archive: "
        f"{root.hi * MB / archive.plaintext_size:.2f}x its size.",
    ]
    median_run = sorted(loads, key=lambda r: r.run.wall)[len(loads) // 2]
    result.picture = UnlockPicture(
        archive_size=archive.size,
        fed=[(t, done) for t, done, _ in median_run.run.trace],
        rss=median_run.rss,
        wall=median_run.run.wall,
        floor=floor,
    )
    return result


def _disk_rows(floors: list[FloorRun], loads: list[LoaderRun]) -> list[Row]:
    written = Spread.of([r.written / MB for r in loads])
    files = sorted({f for r in loads for f in r.writable_files})
    beside = Spread.of([r.disk.beside for r in loads])
    floor_beside = Spread.of([f.disk.beside for f in floors])
    used = Spread.of([r.disk.used for r in loads])
    floor_used = Spread.of([f.disk.used for f in floors])
    spool = Spread.of([r.disk.spool for r in loads])
    root = Spread.of([r.disk.data_root for r in loads])
    floor_spool = Spread.of([f.disk.spool for f in floors])
    floor_root = Spread.of([f.disk.data_root for f in floors])
    return [
        Row(
            "3",
            "unlock: bytes the loader wrote to storage (write_bytes); files it opened to write",
            f"{written.fmt('B', 0) if written.hi == 0 else written.fmt('MB', 3)}; "
            f"{len(files)} files",
            target="0; none",
            met=written.hi == 0 and not files,
            runs=f"write_bytes {runs(written, 3)} MB; files {files or 'none'}",
        ),
        Row(
            "3b",
            "unlock: peak growth beside the archive (du of its folder)",
            beside.fmt("MB", 3),
            f"docker load -i: {floor_beside.fmt('MB', 3)}",
            target="0",
            met=beside.hi == 0,
            runs=f"unlock {runs(beside, 3)} MB; docker load -i {runs(floor_beside, 3)} MB",
        ),
        Row(
            "3c",
            "unlock: peak growth of used space (statvfs) of the archive's and /tmp's filesystem",
            used.fmt("MB", 0),
            f"docker load -i: {floor_used.fmt('MB', 0)}",
            ratio(used, floor_used),
            "= docker load -i",
            runs=f"unlock {runs(used, 0)} MB; docker load -i {runs(floor_used, 0)} MB",
        ),
        Row(
            "3d",
            "Docker's own disk use during the load: data root tmp/ peak; whole data root peak",
            f"{spool.fmt('MB', 0)}; {root.fmt('MB', 0)}",
            f"docker load -i: {floor_spool.fmt('MB', 0)}; {floor_root.fmt('MB', 0)}",
            runs=f"spool {runs(spool, 0)} MB, root {runs(root, 0)} MB; "
            f"docker load -i: spool {runs(floor_spool, 0)} MB, root {runs(floor_root, 0)} MB",
        ),
    ]


# Row 1c

CONCURRENCY = (1, 2, 3)


def _thin_tars(archive: Archive, folder: Path) -> list[Path]:
    """Each image's tar as the unlock cuts it for an empty engine (the OCI layout, only the
    layers no earlier image brings), in plaintext under the bench's work folder."""
    sends = image_sends(archive)
    first = {layer.digest for layer in sends[0][1].layers}
    if any(not present <= first for _, _, present in sends[1:]):
        raise BenchError("row 1c expects a stack whose images share only the first's layers")
    folder.mkdir(exist_ok=True)
    paths = []
    with EncryptedArchive.open(archive.path, archive.key) as source:
        for index, (_, image, present) in enumerate(sends):
            path = folder / f"{index}.tar"
            with open(path, "wb") as out:
                for chunk in image_tar(source, image, present):
                    out.write(chunk)
            paths.append(path)
    return paths


def _docker_load(host: str, path: Path) -> None:
    done = subprocess.run(
        ["docker", "-H", host, "load", "-i", str(path)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise BenchError(f"docker load -i {path} failed: {done.stderr.strip()}")


def concurrency(bench: Bench) -> PartResult:
    """Row 1c: the stack image by image as the unlock cuts it, by `docker load -i` of each
    thin tar: the first (which brings the shared base) alone, then the others N at a time."""
    archive = bench.archive()
    host = bench.dockerd().host
    tars = _thin_tars(archive, bench.work / "thin")
    warm(archive.plain, *tars)
    walls: dict[int, list[float]] = {n: [] for n in CONCURRENCY}
    floors: list[float] = []
    for index in range(bench.runs):
        order = [*CONCURRENCY[index % 3 :], *CONCURRENCY[: index % 3], 0]
        for n in order:
            _images_removed(bench, archive)
            bench.settle()
            started = time.perf_counter()
            if n == 0:
                _docker_load(host, archive.plain)
            else:
                _docker_load(host, tars[0])
                with ThreadPoolExecutor(n) as pool:
                    list(pool.map(lambda path: _docker_load(host, path), tars[1:]))
            wall = time.perf_counter() - started
            _check_loaded(bench, archive, f"loading at concurrency {n}")
            (floors if n == 0 else walls[n]).append(wall)
            print(f"  {'docker load -i' if n == 0 else f'concurrency {n}'}: {wall:.2f} s")
    floor = Spread.of(floors)
    result = PartResult()
    for n in CONCURRENCY:
        spread = Spread.of(walls[n])
        result.rows.append(
            Row(
                f"1c.{n}",
                f"the stack image by image (docker load -i of each thin tar), the first "
                f"alone, then {n} at a time",
                spread.fmt("s", 2),
                f"docker load -i of the whole tar: {floor.fmt('s', 2)}",
                ratio(spread, floor),
                runs=f"{runs(spread, 2)} s; whole tar {runs(floor, 2)} s",
            )
        )
    sizes = ", ".join(f"{path.stat().st_size / MB:,.0f}" for path in tars)
    result.notes.append(
        f"Row 1c: the engine's side of the unlock alone: the {len(tars)} tars the unlock "
        f"sends into an empty engine ({sizes} MB), written in plaintext beforehand and "
        "loaded by the docker CLI, so that only the engine's concurrency differs. Images "
        "removed before every run; the orders of the runs rotate."
    )
    shutil.rmtree(bench.work / "thin", ignore_errors=True)
    return result


# Row 9


def _start_probe(bench: Bench, daemon: Daemon) -> Child:
    probe = bench.spawn(
        "probe",
        [
            sys.executable,
            "-m",
            "bench.loadgen",
            "probe",
            f"--socket={daemon.socket}",
            f"--interval={PROBE_EVERY}",
        ],
        stdin=True,
    )
    probe.wait_line("probing", 30)
    return probe


def _stop_probe(probe: Child, since: float) -> Latencies:
    """The probe's latencies; the slowest one's start is given in seconds after `since`
    (a time.monotonic() value)."""
    probe.close_stdin()
    probe.wait(30)
    samples = [(t - since, s * 1000) for t, s in json.loads(probe.wait_line("{", 5))["samples"]]
    ms = [lat for _, lat in samples]
    worst_at, worst = max(samples, key=lambda sample: sample[1])
    return Latencies(percentile(ms, 50), percentile(ms, 99), worst, worst_at, len(ms))


@dataclass(frozen=True)
class Latencies:
    p50: float
    p99: float
    worst: float
    worst_at: float
    count: int


def health_during_unlock(bench: Bench) -> PartResult:
    """Row 9: a sequential GET /health every 10 ms during an unlock, and with the daemon idle."""
    archive = bench.archive()
    bench.dockerd()
    bench.emulator_url()
    warm(archive.path)
    busy: list[Latencies] = []
    idle: list[Latencies] = []
    sent: list[float] = []
    for _ in range(bench.runs):
        _images_removed(bench, archive)
        daemon = bench.daemon()
        try:
            bench.settle()
            probe = _start_probe(bench, daemon)
            run = _unlock(daemon)
            busy.append(_stop_probe(probe, run.started_monotonic))
            sent.append(_sent_at(run))
            probe = _start_probe(bench, daemon)
            time.sleep(run.wall)  # a measuring window as long as the unlock, not a wait
            idle.append(_stop_probe(probe, time.monotonic()))
        finally:
            daemon.stop()
        last = busy[-1]
        print(
            f"  /health during the unlock: p99 {last.p99:.1f} ms, max {last.worst:.1f} ms "
            f"at {last.worst_at:.2f} s (archive read by {sent[-1]:.2f} s, ready at {run.wall:.2f})"
        )
    p99, idle_p99 = Spread.of([b.p99 for b in busy]), Spread.of([i.p99 for i in idle])
    worst, idle_worst = Spread.of([b.worst for b in busy]), Spread.of([i.worst for i in idle])
    p50, idle_p50 = Spread.of([b.p50 for b in busy]), Spread.of([i.p50 for i in idle])
    result = PartResult()
    result.rows += [
        Row(
            "9",
            "/health during an unlock (every 10 ms): p99",
            p99.fmt("ms", 1),
            f"idle: {idle_p99.fmt('ms', 1)}",
            ratio(p99, idle_p99),
            "< 25 ms",
            p99.median < 25,
            f"p50 {runs(p50, 2)} ms, idle {runs(idle_p50, 2)} ms; "
            f"p99 {runs(p99)} ms, idle {runs(idle_p99)} ms",
        ),
        Row(
            "9b",
            "/health during an unlock: max",
            worst.fmt("ms", 1),
            f"idle: {idle_worst.fmt('ms', 1)}",
            ratio(worst, idle_worst),
            "< 50 ms throughout",
            worst.hi < 50,
            f"max {runs(worst)} ms, idle {runs(idle_worst)} ms; the slowest probe started at "
            + ", ".join(f"{b.worst_at:.2f}" for b in busy)
            + " s after POST /unlock; the archive was read by "
            + ", ".join(f"{s:.2f}" for s in sent)
            + " s",
        ),
    ]
    result.notes.append(
        f"Row 9: {sum(b.count for b in busy)} probes during {len(busy)} unlocks (images removed "
        "before each, a fresh daemon each), each followed by as long a window with that daemon "
        "idle; the probe is a separate process, sequential, on one kept-alive connection, and "
        "/unlock/status is polled every 50 ms alongside, as a client would."
    )
    return result
