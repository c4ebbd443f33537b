"""The table (plain text for the terminal, markdown for the file) and the unlock picture."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bench.harness import DASH, MB
from bench.results import Row, UnlockPicture

HEADERS = (
    "#",
    "what",
    f"measured: median (min{DASH}max, n)",
    "reference, same run",
    "ratio",
    "target",
    "met",
)


def _met(row: Row) -> str:
    return "-" if row.met is None else ("yes" if row.met else "NO")


def _cells(row: Row) -> tuple[str, ...]:
    return (row.key, row.what, row.measured, row.reference, row.ratio, row.target, _met(row))


def text_table(rows: Sequence[Row]) -> str:
    table = [HEADERS, *(_cells(row) for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADERS))]
    lines = [
        " | ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in table
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _md(cell: str) -> str:
    return cell.replace("|", "\\|")


def markdown(
    rows: Sequence[Row],
    notes: Sequence[str],
    machine: Sequence[tuple[str, str]],
    command: str,
    wall: float,
    picture: Path | None,
) -> str:
    out = ["# azaion-loader benchmark", ""]
    out += [f"`{command}`, {wall / 60:.1f} min in all.", "", "## Machine", ""]
    out += [f"- **{key}**: {value}" for key, value in machine]
    out += ["", "## Results", ""]
    out.append("| " + " | ".join(HEADERS) + " |")
    out.append("|" + "|".join("---" for _ in HEADERS) + "|")
    out += ["| " + " | ".join(_md(c) for c in _cells(row)) + " |" for row in rows]
    if picture is not None:
        out += ["", f"![an unlock over time]({picture.name})"]
    out += ["", "## Notes", ""]
    out += [
        "- Figures are the median of the runs, with the smallest and largest in brackets; a "
        "ratio is the ratio of the medians, with the range of the per-run ratios (runs paired "
        "in order) in brackets. MB is 10^6 bytes; RSS in MB is the kernel's kB / 1000.",
        "- Timings share this machine with whatever else runs on it (a VM with 2 vCPUs): "
        "treat differences under about 15% as noise, and compare ratios, which are taken in "
        "the same run, rather than absolute figures across runs.",
    ]
    out += [f"- {note}" for note in notes]
    out += ["", "## Every run", ""]
    out += [f"- **{row.key}** {row.what}: {row.runs}" for row in rows if row.runs]
    return "\n".join(out) + "\n"


def plot(picture: UnlockPicture, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, fed_axis = pyplot.subplots(figsize=(10, 5.5), dpi=110)
    floor = picture.floor
    fed_axis.axvspan(floor.lo, floor.hi, color="tab:gray", alpha=0.2, label="docker load -i, range")
    fed_axis.axvline(floor.median, color="tab:gray", linestyle="--", label="docker load -i, median")
    fed_axis.axvline(picture.wall, color="tab:blue", linestyle=":", label="unlock: state ready")
    times = [t for t, _ in picture.fed]
    fed_axis.plot(
        times,
        [done / MB for _, done in picture.fed],
        color="tab:blue",
        label="bytes fed to Docker (bytesDone)",
    )
    fed_axis.set_xlabel("seconds since POST /unlock")
    fed_axis.set_ylabel("archive bytes read, decrypted and sent to Docker (MB)")
    fed_axis.set_ylim(bottom=0)
    fed_axis.set_xlim(left=0, right=max(picture.wall, floor.hi) * 1.05)
    rss_axis = fed_axis.twinx()
    rss_axis.plot(
        [t for t, _ in picture.rss],
        [mb for _, mb in picture.rss],
        color="tab:red",
        label="daemon RSS (VmRSS)",
    )
    rss_axis.set_ylabel("daemon RSS (MB)")
    rss_axis.set_ylim(0, max(100.0, max((mb for _, mb in picture.rss), default=0) * 1.2))
    rss_axis.axhline(80, color="tab:red", linestyle="--", linewidth=0.8, label="RSS target 80 MB")
    handles, labels = fed_axis.get_legend_handles_labels()
    more_handles, more_labels = rss_axis.get_legend_handles_labels()
    fed_axis.legend(handles + more_handles, labels + more_labels, loc="center right", fontsize=8)
    fed_axis.set_title(
        f"Unlock of a {picture.archive_size / 2**30:.2f} GiB archive "
        f"({picture.archive_size / MB:,.0f} MB): the run of median wall time"
    )
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
