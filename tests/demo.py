"""The demo stack for `./dev run`: an engine, and an encrypted archive to unlock into it.

    python -m tests.demo --state run

Picks an engine: a private dockerd when this runs as root and docker.io is installed (no
bridge, no iptables; it starts empty and is removed on exit, so every run unlocks for
real), else the engine at $DOCKER_HOST or /var/run/docker.sock. Then it writes
STATE/images.enc once: the seven stack images, generated here (nothing can be pulled),
saved and encrypted with the emulator's archive fragment, and removed from the engine
again so that the unlock has them to load.

It prints one line, `demo engine HOST` or `demo unavailable: WHY`, and with a private
engine stays up until SIGTERM or SIGINT, which stop the engine.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from loader.images import DEFAULT_HOST
from tests.dockerd import (
    MiB,
    PrivateDockerd,
    build_stack_images,
    ping,
    present_images,
    remove_images,
    stack_tags,
    write_archive,
)
from tests.emulator.config import DEV_ARCHIVE_FRAGMENT

# The stack's version that the daemon asks for by default (API_VERSION).
VERSION = "latest"
IMAGE_BYTES = 3 * MiB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--state", type=Path, required=True, help="where images.enc goes")
    parser.add_argument("--image-mb", type=int, default=IMAGE_BYTES // MiB, help="per image")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    archive = args.state / "images.enc"
    tags = stack_tags(VERSION)

    private = None
    if PrivateDockerd.available() is None:
        private = PrivateDockerd()
        private.start()
        host = private.host
    else:
        host = os.environ.get("DOCKER_HOST") or DEFAULT_HOST
        if not host.startswith("unix://") or not ping(Path(host.removeprefix("unix://"))):
            print(
                f"demo unavailable: no Docker engine answers at {host}, and none can be "
                f"started here ({PrivateDockerd.available()})",
                flush=True,
            )
            return 0
    try:
        if not archive.exists():
            if present_images(host, tags):
                print(
                    f"demo unavailable: the engine at {host} already has stack images "
                    "(left as they are)",
                    flush=True,
                )
                return 0
            build_stack_images(host, VERSION, payload_bytes=args.image_mb * MiB * len(tags))
            try:
                write_archive(host, tags, DEV_ARCHIVE_FRAGMENT, archive)
            finally:
                remove_images(host, tags)
        print(f"demo engine {host}", flush=True)
        if private is not None:
            stop.wait()
    finally:
        if private is not None:
            private.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
