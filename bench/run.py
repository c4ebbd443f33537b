"""Run the azaion-loader benchmark suite, print one table, write it as markdown.

    python bench/run.py [--only PART ...] [--runs N] [--size-unlock 1GiB]
        [--size-resource 500MB] [--out bench/results.md] [--png bench/unlock.png]

Needs root (a private dockerd), docker.io, openssl and systemd-socket-activate. Every
process it starts (dockerd, the emulator, the daemons, the load generators) is stopped
when it ends, however it ends. See bench/README.md for what each row means.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import machine, report
from bench.fixtures import Bench
from bench.make_archive import parse_size
from bench.parts import crypto, podman, resources, serving, unlock
from bench.results import PartResult, Row

HERE = Path(__file__).resolve().parent

# In the order they run; upload before the loads, which then find the resource in place.
PARTS: dict[str, tuple[str, Callable[[Bench], PartResult]]] = {
    "unlock": ("rows 1-3: unlock vs docker load -i, RSS, disk writes", unlock.unlock),
    "unlock-concurrency": (
        "row 1c: the engine loading image by image, 1-3 at a time",
        unlock.concurrency,
    ),
    "unlock-podman": ("rows 1d-1e: unlock into Podman vs podman load -i", podman.unlock_podman),
    "health-unlock": ("row 9: /health latency during an unlock", unlock.health_during_unlock),
    "decrypt": ("row 4: decryption alone vs openssl", crypto.decrypt),
    "upload": ("row 7: /upload", resources.upload),
    "roundtrip": ("row 7c: upload then load, same bytes", resources.roundtrip),
    "load-cached": ("row 5: /load from the cache", resources.load_cached),
    "load-cdn": ("row 6: /load from the CDN", resources.load_cdn),
    "health": ("row 8: /health at concurrency 50", serving.health_burst),
    "cold-start": ("row 10: cold start by socket activation", serving.cold_start),
    "idle-rss": ("row 11: idle RSS", serving.idle_rss),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="parts: " + "; ".join(f"{name} ({what})" for name, (what, _) in PARTS.items()),
    )
    parser.add_argument(
        "--only", nargs="+", choices=list(PARTS), metavar="PART", help="run these parts only"
    )
    parser.add_argument("--runs", type=int, default=5, help="runs per figure (default 5)")
    parser.add_argument("--size-unlock", type=parse_size, default=parse_size("1GiB"))
    parser.add_argument("--size-resource", type=parse_size, default=parse_size("500MB"))
    parser.add_argument("--out", type=Path, default=HERE / "results.md")
    parser.add_argument("--png", type=Path, default=HERE / "unlock.png")
    parser.add_argument(
        "--work",
        type=Path,
        help="keep the archive and other inputs here and reuse them next time "
        "(default: a fresh folder under /var/tmp, removed at the end)",
    )
    return parser


def _row_order(row: Row) -> tuple[int, str]:
    digits = "".join(c for c in row.key if c.isdigit())
    return int(digits or 0), row.key


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.runs < 1:
        _parser().error("--runs must be at least 1")
    signal.signal(signal.SIGTERM, _terminate)
    command = "python bench/run.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    chosen = args.only or list(PARTS)
    started = time.perf_counter()
    load_before = machine.load_average()
    revision = machine.loader_revision()
    bench = Bench(args.runs, args.size_unlock, args.size_resource, args.work)
    results: list[PartResult] = []
    failed: list[str] = []
    try:
        for name in (name for name in PARTS if name in chosen):
            what, part = PARTS[name]
            print(f"== {name}: {what}", flush=True)
            part_started = time.perf_counter()
            try:
                results.append(part(bench))
            except Exception as exc:
                traceback.print_exc()
                failed.append(name)
                results.append(PartResult(notes=[f"The part {name} failed: {exc}"]))
            print(f"   ({time.perf_counter() - part_started:.0f} s)", flush=True)
    finally:
        bench.close()
    wall = time.perf_counter() - started

    rows = sorted((row for result in results for row in result.rows), key=_row_order)
    notes = [note for result in results for note in result.notes]
    notes.append(
        f"Before each timed run the bench waited for the CPUs to be at least 85% idle for "
        f"1.5 s, at most 30 s: {bench.noisy_starts} of {bench.quiet_waits} runs started "
        "without that (other work on the machine)."
    )
    if machine.loader_revision() != revision:
        notes.append(
            f"The checkout changed during the run: it was at {revision} when the run started, "
            f"and is at {machine.loader_revision()} now."
        )
    notes.append(
        f"Load average (1, 5, 15 min) at the start: {load_before}; at the end: "
        f"{machine.load_average()}."
    )
    picture = next((r.picture for r in results if r.picture is not None), None)
    png: Path | None = None
    if picture is not None:
        report.plot(picture, args.png)
        png = args.png
        print(f"wrote {png}")
    print()
    print(report.text_table(rows))
    print()
    args.out.write_text(
        report.markdown(rows, notes, machine.describe(revision), command, wall, png)
    )
    print(f"wrote {args.out}; whole run {wall:.0f} s ({wall / 60:.1f} min)")
    if failed:
        print(f"failed parts: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
