"""Runs the emulator until SIGTERM or SIGINT: ``python -m tests.emulator --help``.

Once it listens it prints one line, ``emulator listening on http://HOST:PORT``,
so that a caller passing ``--port 0`` learns the port.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from .config import (
    DEV_ARCHIVE_FRAGMENT,
    DEV_PASSWORD,
    DEV_RESOURCE_FRAGMENT,
    DEV_USER,
    EmulatorConfig,
)
from .emulator import Emulator
from .faults import FaultRates, FaultRule
from .server import make_app


def _user(value: str) -> tuple[str, str]:
    email, colon, password = value.partition(":")
    if not colon or not email:
        raise argparse.ArgumentTypeError("expected EMAIL:PASSWORD")
    return email, password


def _hex(value: str) -> bytes:
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise argparse.ArgumentTypeError("expected hexadecimal digits") from None


def _file_bytes(value: str) -> bytes:
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {value}: {exc.strerror}") from None


def _rule(value: str) -> FaultRule:
    try:
        return FaultRule.from_json(json.loads(value))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.emulator",
        description="Emulates the Azaion Resource API at / and its CDN at /cdn.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument(
        "--user",
        type=_user,
        action="append",
        metavar="EMAIL:PASSWORD",
        help=f"an account, repeatable (default {DEV_USER}:{DEV_PASSWORD})",
    )
    for what, default in (("archive", DEV_ARCHIVE_FRAGMENT), ("resource", DEV_RESOURCE_FRAGMENT)):
        group = parser.add_mutually_exclusive_group()
        dest = f"{what}_fragment"
        group.add_argument(f"--{what}-fragment-hex", dest=dest, type=_hex, metavar="HEX")
        group.add_argument(f"--{what}-fragment-file", dest=dest, type=_file_bytes, metavar="PATH")
        parser.set_defaults(**{dest: default})
    parser.add_argument("--token-ttl", type=float, default=3600.0, metavar="SECONDS")
    parser.add_argument(
        "--storage", type=Path, metavar="DIR", help="where parts are kept (default: a temp dir)"
    )
    faults = parser.add_argument_group("faults")
    faults.add_argument("--error-rate", type=float, default=0.0, help="share of 503 answers")
    faults.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    faults.add_argument("--drop-rate", type=float, default=0.0, help="share of closed connections")
    faults.add_argument(
        "--truncate-rate", type=float, default=0.0, help="share of bodies cut short"
    )
    faults.add_argument("--seed", type=int, help="seed of the random faults")
    faults.add_argument(
        "--fault",
        type=_rule,
        action="append",
        default=[],
        metavar="JSON",
        help='a FaultRule as JSON, repeatable: {"path_prefix": "/cdn/", "kind": "drop"}',
    )
    parser.add_argument(
        "--refuse-early",
        action="store_true",
        help="answer a refused request before reading its body, as nginx does",
    )
    parser.add_argument(
        "--cdn-requires-length",
        action="store_true",
        help="refuse a big part sent chunked (without Content-Length) with 411",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request")
    return parser


def _config(args: argparse.Namespace, storage_dir: Path) -> EmulatorConfig:
    rates = FaultRates(
        error_rate=args.error_rate,
        delay=args.delay,
        drop_rate=args.drop_rate,
        truncate_rate=args.truncate_rate,
    )
    return EmulatorConfig(
        storage_dir=storage_dir,
        users=dict(args.user or [(DEV_USER, DEV_PASSWORD)]),
        archive_fragment=args.archive_fragment,
        resource_fragment=args.resource_fragment,
        token_ttl=args.token_ttl,
        rates=rates,
        rules=tuple(args.fault),
        seed=args.seed,
        refuse_early=args.refuse_early,
        cdn_requires_length=args.cdn_requires_length,
    )


async def _serve(config: EmulatorConfig, host: str, port: int) -> None:
    runner = web.AppRunner(make_app(Emulator(config)))
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_port = runner.addresses[0][1]
        url_host = f"[{host}]" if ":" in host else host
        print(f"emulator listening on http://{url_host}:{bound_port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    with contextlib.ExitStack() as stack:
        storage: Path = args.storage
        if storage is None:
            scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="azaion-emulator-"))
            storage = Path(scratch)
        try:
            config = _config(args, storage)
        except ValueError as exc:
            parser.error(str(exc))
        storage.mkdir(parents=True, exist_ok=True)
        try:
            asyncio.run(_serve(config, args.host, args.port))
        except OSError as exc:
            print(f"emulator: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
