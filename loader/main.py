"""The `azaion-loader` command; the only place that exits the process."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from http import HTTPStatus

from loader import __version__, cli, systemd
from loader import log as logs
from loader.errors import ConfigError, CrashLoop, ServerError
from loader.settings import Settings

log = logging.getLogger("loader")

# sysexits.h EX_CONFIG: the unit's RestartPreventExitStatus= stops a restart loop on bad config.
# Socket-activated, the daemon first answers the requests waiting (503 config-error), so
# none is left to start it again: each later request starts it once, until the fix.
EXIT_CONFIG = 78
# sysexits.h EX_TEMPFAIL: this start ends a crash loop (systemd.Runs); the unit's
# RestartPreventExitStatus= does not restart it, and the next request starts it again.
EXIT_CRASH_LOOP = 75
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
    redact = logs.Redactor()
    logs.setup("info", redact)
    runs = systemd.Runs.from_env(os.environ)
    try:
        settings = Settings.from_env(os.environ)
    except ConfigError as exc:
        runs.clean()
        log.error("configuration error: %s", exc.message)
        _answer_waiting(f"configuration error: {redact(exc.message)}", exc.status, exc.code)
        return EXIT_CONFIG
    if not runs.start():
        told = CrashLoop(
            f"the daemon crashed {runs.crashes} times in a row, each within "
            f"{systemd.CRASH_LOOP_WINDOW:.0f} s of its start: it is not restarted again "
            "until the next request (see `journalctl -u azaion-loader`)"
        )
        log.error("%s", told.message)
        _answer_waiting(told.message, told.status, told.code)
        return EXIT_CRASH_LOOP
    if runs.crashes:
        log.warning("starting after %d crash(es) in a row", runs.crashes)
    logging.getLogger().setLevel(settings.log_level.upper())

    from loader.server import serve as serve_forever

    try:
        asyncio.run(serve_forever(settings, os.environ, redact))
    except ServerError as exc:
        log.error("cannot start: %s", exc.message)
        return EXIT_FAILURE
    runs.clean()
    return 0


def _answer_waiting(detail: str, status: int, code: str) -> None:
    """Under socket activation: `status` to the requests already waiting on the socket."""
    try:
        sock = systemd.inherited_socket(os.environ)
    except ServerError:
        return
    if sock is None:
        return
    body = json.dumps({"detail": detail, "code": code}).encode()
    line = f"{status} {HTTPStatus(status).phrase}"
    answered = systemd.answer_waiting(sock, line, body)
    if answered:
        log.error("answered %d waiting request(s) with %s %s", answered, status, code)


if __name__ == "__main__":
    sys.exit(main())
