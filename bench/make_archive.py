"""Make an encrypted image archive of the seven stack images, of about a given size.

    python bench/make_archive.py --size 1GiB --version latest --fragment-hex 00ff... \\
        --out /var/tmp/images.enc [--plain /var/tmp/images.tar] [--docker-host unix://...] \\
        [--base-share 0.4]

With --base-share, the images share a base layer holding that share of the payload (like
real stacks built FROM one runtime image), and each has a layer of its own; without it,
each image is one layer.

Without --docker-host it runs a private dockerd of its own (root needed) and stops it
afterwards; with one, the images it built are removed again unless --keep-images.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.dockerd import (
    DEFAULT_SEED,
    STACK_NAMES,
    PrivateDockerd,
    Target,
    build_shared_base_stack,
    build_stack_images,
    remove_images,
    write_archive,
)

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
}


def parse_size(text: str) -> int:
    """'1GiB', '500MB', '64MiB', '12345' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1GiB, 500MB, 4096)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_hex(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not hex") from None


def _mb(n: int) -> str:
    return f"{n:,} B ({n / (1 << 20):.1f} MiB)"


def make(args: argparse.Namespace, target: Target) -> None:
    started = time.monotonic()
    if args.base_share:
        tags = build_shared_base_stack(target, args.version, args.size, args.base_share, args.seed)
    else:
        tags = build_stack_images(target, args.version, args.size, args.seed)
    built = time.monotonic()
    print(f"built {len(tags)} images in {built - started:.2f} s: {' '.join(tags)}")
    try:
        info = write_archive(target, tags, args.fragment_hex, args.out, plain=args.plain)
        written = time.monotonic()
        print(f"archive {info.path}: {_mb(info.size)}, in {written - built:.2f} s")
        print(f"plaintext: {_mb(info.plaintext_size)}, sha256 {info.plaintext_sha256}")
        if args.plain:
            print(f"plain tar {args.plain}: the same plaintext")
    finally:
        if args.docker_host and not args.keep_images:
            remove_images(target, tags)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size",
        type=parse_size,
        default=parse_size("1GiB"),
        help="random payload over all images (default 1GiB)",
    )
    parser.add_argument("--version", default="latest", help="the tag of every image")
    parser.add_argument("--fragment-hex", type=parse_hex, required=True)
    parser.add_argument("--out", type=Path, required=True, help="the encrypted archive")
    parser.add_argument(
        "--plain", type=Path, help="also write the plaintext tar (for `docker load -i`)"
    )
    parser.add_argument("--docker-host", help="use this daemon instead of a private one")
    parser.add_argument("--keep-images", action="store_true")
    parser.add_argument(
        "--base-share",
        type=float,
        default=0.0,
        help="the share of the payload in a base layer all images share (e.g. 0.4)",
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    print(f"images: {len(STACK_NAMES)}, payload {_mb(args.size)}")

    if args.docker_host:
        make(args, args.docker_host)
        return 0
    reason = PrivateDockerd.available()
    if reason:
        parser.error(f"cannot run a private dockerd ({reason}); pass --docker-host")
    started = time.monotonic()
    with PrivateDockerd() as daemon:
        print(f"private dockerd on {daemon.host}, ready in {time.monotonic() - started:.2f} s")
        make(args, daemon)
        stopping = time.monotonic()
    print(f"private dockerd stopped in {time.monotonic() - stopping:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
