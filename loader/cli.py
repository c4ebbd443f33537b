"""The client commands for people on the device: status, login, unlock, load, upload, metrics.

They talk to the daemon over its socket, as the local services do (`doctor` too, after
checking on its own what only the caller can see): the session is `client.Daemon`, the
progress bar `terminal.ProgressBar`; here are the parser and the commands. What only a client
command needs is imported inside it: `serve` starts on the same parser, and every
millisecond of its start-up delays the first request after socket activation.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp

from loader.client import DEFAULT_SOCKET, Daemon, Failed, Unreachable
from loader.terminal import ProgressBar

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES = (
    "exit status: 0 done, 1 failed, 2 usage error, 3 cannot reach the daemon, "
    "130 interrupted (Ctrl-C)"
)
_POLL = 0.5
_FILE_READ = 256 * 1024


def add_commands(commands: Any) -> None:
    """Add the client commands to the `azaion-loader` parser's subcommands."""

    def command(name: str, help: str, example: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = commands.add_parser(
            name,
            help=help,
            description=help[0].upper() + help[1:] + ".",
            epilog=f"example:\n  {example}\n\n{EXIT_CODES}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        parser.add_argument(
            "--socket",
            default=os.environ.get("LOADER_SOCKET") or DEFAULT_SOCKET,
            help="the daemon's socket (default: $LOADER_SOCKET, else %(default)s)",
        )
        parser.set_defaults(run=_COMMANDS[name])
        return parser

    status = command(
        "status",
        "show the daemon's health, login, model cache and unlock state",
        "azaion-loader status",
    )
    status.add_argument("--json", action="store_true", help="print the daemon's raw answers")

    doctor = command(
        "doctor",
        "check everything an unlock or a load needs, here and through the daemon",
        "azaion-loader doctor",
    )
    doctor.epilog = (
        "example:\n  azaion-loader doctor\n\nOne line per check: ok, warning or failed, with "
        "the figure or the cause\nand what to do.\n\nexit status: 0 no check failed (warnings "
        "allowed), 1 a check failed or the\ndaemon cannot be reached, 2 usage error"
    )
    doctor.add_argument("--json", action="store_true", help='print {"checks": [...]}')

    for name, help, example in (
        (
            "login",
            "log the daemon in to the Resource API",
            "azaion-loader login --email ops@example.com",
        ),
        (
            "unlock",
            "unlock the image archive into Docker and follow its progress",
            "azaion-loader unlock --email ops@example.com",
        ),
    ):
        parser = command(name, help, example)
        parser.add_argument("--email", required=True, help="the Resource API account")
        parser.add_argument(
            "--password-stdin",
            action="store_true",
            help="read the password from standard input (it is never taken as an argument)",
        )
        if name == "unlock":
            parser.add_argument(
                "--no-wait", action="store_true", help="start the unlock and return at once"
            )

    load = command(
        "load",
        "fetch and decrypt a resource into a file",
        "azaion-loader load models/yolo.onnx -o yolo.onnx",
    )
    load.add_argument("resource", metavar="FOLDER/NAME", help="the resource to fetch")
    load.add_argument(
        "-o", "--output", required=True, help="the file to write, or - for standard output"
    )

    upload = command(
        "upload",
        "encrypt a file and publish it as a resource",
        "azaion-loader upload yolo.onnx --folder models",
    )
    upload.add_argument("file", type=Path, help="the file to publish")
    upload.add_argument("--folder", required=True, help="the resource folder")
    upload.add_argument("--name", help="the resource name (default: the file's name)")

    metrics = command(
        "metrics",
        "print the daemon's metrics in Prometheus's text format, or write them to a file "
        "for node_exporter's textfile collector",
        "azaion-loader metrics --textfile /var/lib/prometheus/node-exporter/azaion-loader.prom",
    )
    metrics.add_argument(
        "--textfile",
        type=Path,
        help="write them to this file instead (replaced whole, mode 0644); name it *.prom "
        "in node_exporter's --collector.textfile.directory",
    )


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(args.run(args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Unreachable as exc:
        print(f"azaion-loader: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except Failed as exc:
        print(f"azaion-loader: {exc}", file=sys.stderr)
        return EXIT_FAILED


async def _status(args: argparse.Namespace) -> int:
    async with Daemon(args.socket) as daemon:
        health = await daemon.json("GET", "/health")
        status = await daemon.json("GET", "/status")
        unlock = await daemon.json("GET", "/unlock/status")
    if args.json:
        print(json.dumps({"health": health, "status": status, "unlock": unlock}, indent=2))
        return EXIT_OK
    rows = [
        ("daemon", f"{health.get('status')} on {args.socket}"),
        ("logged in", "yes" if status.get("authenticated") else "no"),
        ("model cache", status.get("modelCacheDir")),
        ("unlock", _unlock_summary(unlock)),
    ]
    for label, value in rows:
        print(f"{label + ':':<13}{value}")
    return EXIT_OK


async def _doctor(args: argparse.Namespace) -> int:
    from loader.doctor import FAILED, Check, checks_from, client_checks

    checks = await asyncio.to_thread(client_checks, args.socket, DEFAULT_SOCKET)
    try:
        async with Daemon(args.socket) as daemon:
            checks += checks_from(await daemon.json("GET", "/doctor"))
    except (Unreachable, Failed) as exc:
        checks.append(Check("daemon", FAILED, f"its checks did not run: {exc}"))
    if args.json:
        print(json.dumps({"checks": [check.as_json() for check in checks]}, indent=2))
    else:
        for check in checks:
            print(check.line())
    return EXIT_FAILED if any(check.status == FAILED for check in checks) else EXIT_OK


async def _login(args: argparse.Namespace) -> int:
    password = _password(args)
    async with Daemon(args.socket) as daemon:
        await daemon.json("POST", "/login", json={"email": args.email, "password": password})
    print(f"logged in as {args.email}")
    return EXIT_OK


async def _unlock(args: argparse.Namespace) -> int:
    password = _password(args)
    async with Daemon(args.socket) as daemon:
        answer = await daemon.json(
            "POST", "/unlock", json={"email": args.email, "password": password}
        )
        if args.no_wait or answer.get("state") == "ready":
            print(f"unlock: {answer.get('state')}")
            return EXIT_OK
        progress = ProgressBar(sys.stdout, "unlock")
        try:
            while True:
                status = await daemon.json("GET", "/unlock/status")
                state = status.get("state")
                if state == "ready":
                    progress.finish(f"ready: {len(status.get('images') or [])} images loaded")
                    return EXIT_OK
                if state == "error":
                    progress.finish(f"failed: {status.get('error')}")
                    return EXIT_FAILED
                progress.update(
                    _unlock_stage(status),
                    int(status.get("bytesDone") or 0),
                    int(status.get("bytesTotal") or 0),
                    # The engine's work, not only the bytes handed over.
                    fraction=float(status.get("percent") or 0) / 100,
                )
                await asyncio.sleep(_POLL)
        except (KeyboardInterrupt, asyncio.CancelledError):
            progress.finish(
                "stopped following: the unlock goes on in the background "
                "(`azaion-loader status` shows where it stands)"
            )
            raise KeyboardInterrupt from None


async def _load(args: argparse.Namespace) -> int:
    folder, sep, name = args.resource.partition("/")
    if not sep or not folder or not name or "/" in name:
        raise Failed(f"expected FOLDER/NAME, got {args.resource!r}")
    async with (
        Daemon(args.socket) as daemon,
        daemon.request("POST", f"/load/{name}", json={"filename": name, "folder": folder}) as resp,
    ):
        total = resp.content_length or 0
        if args.output == "-":
            await _copy(resp, sys.stdout.buffer, total, ProgressBar(sys.stderr, "load"))
            return EXIT_OK
        target = Path(args.output)
        partial = target.with_name(f".{target.name}.{os.getpid()}.part")
        try:
            with open(partial, "wb") as out:  # noqa: ASYNC230 - a one-shot command
                await _copy(resp, out, total, ProgressBar(sys.stderr, "load"))
            os.replace(partial, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
    print(f"wrote {target} ({total} bytes)", file=sys.stderr)
    return EXIT_OK


async def _upload(args: argparse.Namespace) -> int:
    name = args.name or args.file.name
    try:
        source = open(args.file, "rb")  # noqa: SIM115, ASYNC230 - closed below
    except OSError as exc:
        raise Failed(f"cannot read {args.file}: {exc.strerror}") from None
    with source:
        total = os.fstat(source.fileno()).st_size
        progress = ProgressBar(sys.stderr, "upload")

        async def chunks() -> AsyncIterator[bytes]:
            done = 0
            while data := await asyncio.to_thread(source.read, _FILE_READ):
                done += len(data)
                progress.update("uploading", done, total)
                yield data

        form = aiohttp.MultipartWriter("form-data")
        form.append(args.folder).set_content_disposition("form-data", name="folder")
        form.append(chunks(), {"Content-Type": "application/octet-stream"}).set_content_disposition(
            "form-data", name="data", filename=name
        )
        async with Daemon(args.socket) as daemon:
            await daemon.json("POST", f"/upload/{name}", data=form)
        progress.finish(f"uploaded {args.folder}/{name} ({total} bytes)")
    return EXIT_OK


async def _metrics(args: argparse.Namespace) -> int:
    async with Daemon(args.socket) as daemon, daemon.request("GET", "/metrics") as resp:
        text = await resp.read()
    if args.textfile is None:
        sys.stdout.buffer.write(text)
        sys.stdout.flush()
    else:
        _write_whole(args.textfile, text, mode=0o644)
    return EXIT_OK


def _write_whole(target: Path, data: bytes, mode: int) -> None:
    """`target` replaced by `data` at once: a reader (node_exporter) never sees half a file.
    The temporary file's name does not end in .prom, which the textfile collector skips."""
    import tempfile

    try:
        fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    except OSError as exc:
        raise Failed(f"cannot write {target}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            os.fchmod(out.fileno(), mode)
        os.replace(partial, target)
    except OSError as exc:
        raise Failed(f"cannot write {target}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)


async def _copy(resp: Any, out: BinaryIO, total: int, progress: ProgressBar) -> None:
    done = 0
    async for chunk in resp.content.iter_chunked(_FILE_READ):
        await asyncio.to_thread(out.write, chunk)
        done += len(chunk)
        progress.update("loading", done, total)
    if total and done != total:
        raise Failed(f"the daemon sent {done} of {total} bytes: the load failed midway")
    progress.finish(f"{done} bytes")


def _unlock_stage(status: dict[str, Any]) -> str:
    """ "loading image 3 of 7" while images load, else the state in words."""
    if status.get("state") == "loading_images" and status.get("imagesTotal"):
        current = min(int(status.get("imagesDone") or 0) + 1, int(status["imagesTotal"]))
        return f"loading image {current} of {status['imagesTotal']}"
    return str(status.get("state")).replace("_", " ")


def _password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        import getpass

        password = getpass.getpass(f"password for {args.email}: ")
    if not password:
        raise Failed("no password given")
    return password


def _unlock_summary(unlock: dict[str, Any]) -> str:
    state = str(unlock.get("state"))
    if state == "error":
        return f"error: {unlock.get('error')}"
    if state == "ready":
        return f"ready ({len(unlock.get('images') or [])} images)"
    if unlock.get("bytesTotal"):
        return f"{state.replace('_', ' ')} {unlock.get('percent', 0)}%"
    return state.replace("_", " ")


# Each command's coroutine, by the name it is called by.
_COMMANDS: dict[str, Callable[[argparse.Namespace], Awaitable[int]]] = {
    "status": _status,
    "doctor": _doctor,
    "login": _login,
    "unlock": _unlock,
    "load": _load,
    "upload": _upload,
    "metrics": _metrics,
}
