"""Row 4: decrypting the archive alone, loader.crypto against `openssl enc -d`."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from bench.fixtures import Bench
from bench.harness import MB, BenchError, Spread, warm
from bench.results import PartResult, Row, ratio, runs
from loader.crypto import Decryptor
from loader.unlock import ARCHIVE_READ

SWEEP = (64 * 1024, 256 * 1024, 1024 * 1024, 4096 * 1024)


def decrypt_file(path: Path, key: bytes, chunk: int) -> float:
    """Seconds to read `path` and decrypt it with loader.crypto, output discarded."""
    started = time.perf_counter()
    decryptor = Decryptor(key)
    with open(path, "rb", buffering=0) as source:
        while piece := source.read(chunk):
            decryptor.update(piece)
    decryptor.finalize()
    return time.perf_counter() - started


def openssl_decrypt(ciphertext: Path, key: bytes, iv: bytes) -> float:
    """Seconds for `openssl enc -d -aes-256-cbc` of the IV-less ciphertext to /dev/null."""
    command = ["openssl", "enc", "-d", "-aes-256-cbc", "-K", key.hex(), "-iv", iv.hex()]
    command += ["-in", str(ciphertext), "-out", "/dev/null"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise BenchError(f"openssl enc -d failed: {done.stderr.strip()}")
    return seconds


def _sweep(bench: Bench, path: Path, key: bytes, chunk: int) -> Spread:
    speeds = []
    size = path.stat().st_size / MB
    for _ in range(bench.runs):
        bench.settle()
        speeds.append(size / decrypt_file(path, key, chunk))
    return Spread.of(speeds)


def decrypt(bench: Bench) -> PartResult:
    archive = bench.archive()
    ciphertext = bench.ciphertext_only()
    warm(archive.path, ciphertext)
    size = ciphertext.stat().st_size / MB
    ours: list[float] = []
    theirs: list[float] = []
    for index in range(bench.runs):
        for step in ("ours", "openssl") if index % 2 == 0 else ("openssl", "ours"):
            bench.settle()
            if step == "ours":
                ours.append(size / decrypt_file(archive.path, archive.key, ARCHIVE_READ))
            else:
                theirs.append(size / openssl_decrypt(ciphertext, archive.key, archive.iv))
        print(f"  decryption: loader.crypto {ours[-1]:,.0f} MB/s, openssl {theirs[-1]:,.0f} MB/s")
    mine, ref = Spread.of(ours), Spread.of(theirs)
    sweep = {size: _sweep(bench, archive.path, archive.key, size) for size in SWEEP}
    result = PartResult()
    result.rows.append(
        Row(
            "4",
            f"archive decryption alone ({size:,.0f} MB, warm cache, "
            f"{ARCHIVE_READ // 1024} KiB reads)",
            mine.fmt("MB/s", 0),
            f"openssl enc -d: {ref.fmt('MB/s', 0)}",
            ratio(mine, ref),
            ">= 1.0x",
            mine.median / ref.median >= 1.0,
            f"loader.crypto {runs(mine, 0)} MB/s; openssl {runs(ref, 0)} MB/s",
        )
    )
    result.rows.append(
        Row(
            "4b",
            "archive decryption alone by read size (loader.crypto.Decryptor)",
            "; ".join(
                f"{size // 1024} KiB: {speed.fmt('MB/s', 0)}" for size, speed in sweep.items()
            ),
            runs="; ".join(
                f"{size // 1024} KiB {runs(speed, 0)} MB/s" for size, speed in sweep.items()
            ),
        )
    )
    result.notes.append(
        "Row 4: loader.crypto.Decryptor in the bench's own process reading the archive with "
        "loader.unlock.ARCHIVE_READ, against `openssl enc -d -aes-256-cbc -K .. -iv .. -in "
        "CIPHERTEXT -out /dev/null` on the same bytes without the IV (its process start, a few "
        "ms, included); alternating, output discarded."
    )
    return result
