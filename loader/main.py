"""The `azaion-loader` command; the only place that exits the process."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import sys

from loader import __version__, cli
from loader import log as logs
from loader.errors import ConfigError, ServerError
from loader.settings import Settings

log = logging.getLogger("loader")

# sysexits.h EX_CONFIG: the unit's RestartPreventExitStatus= stops a restart loop on bad config.
EXIT_CONFIG = 78
EXIT_FAILURE = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="azaion-loader",
        description="Unlocks Azaion's encrypted Docker images and serves encrypted resources "
        "to the services on this device, over HTTP on a Unix socket.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "serve",
        help="run the daemon",
        description="Run the daemon in the foreground. Under systemd it serves the socket "
        "systemd passes (socket activation); otherwise it binds LOADER_SOCKET itself. "
        "Configuration comes from the environment: see azaion-loader(8).",
        epilog="example: LOADER_SOCKET=./loader.sock azaion-loader serve",
    ).set_defaults(run=None)
    cli.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve()
    return cli.run(args)


def serve() -> int:
    _tune_malloc()
    redact = logs.Redactor()
    logs.setup("info", redact)
    try:
        settings = Settings.from_env(os.environ)
    except ConfigError as exc:
        log.error("configuration error: %s", exc.message)
        return EXIT_CONFIG
    logging.getLogger().setLevel(settings.log_level.upper())

    from loader.server import serve as serve_forever

    try:
        asyncio.run(serve_forever(settings, os.environ, redact))
    except ServerError as exc:
        log.error("cannot start: %s", exc.message)
        return EXIT_FAILURE
    return 0


def _tune_malloc() -> None:
    """Keep the RSS of a long-running daemon flat under big transfers (bench/soak.py).

    glibc gives every thread that allocates an arena of its own, and the worker threads
    that read, decrypt and write transfer buffers would each keep one's worth of freed
    memory. Two arenas are plenty. (A fixed mmap threshold flattened the RSS further but
    cost /load and /upload a fifth of their speed: bench/ rows 5 and 7.)
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own symbols: libc's, if glibc
    except (OSError, AttributeError):
        return  # not glibc
    mallopt(_M_ARENA_MAX, 2)


# malloc.h
_M_ARENA_MAX = -8


if __name__ == "__main__":
    sys.exit(main())
