"""GET /metrics in Prometheus's text format, read with prometheus_client's own parser: the
values move with unlocks, loads, uploads and remote calls, and carry no secret."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loader import __version__
from loader.settings import Settings
from tests.conftest import (
    EMAIL,
    PASSWORD,
    LocalApp,
    RunningEmulator,
    Spawn,
    daemon_env,
    loader_command,
    socket_answers,
    wait_for,
)
from tests.dockerd import ArchiveInfo, PrivateDockerd
from tests.emulator import FaultRule
from tests.test_cli import cli
from tests.test_resources import FOLDER, load, login, upload
from tests.test_unlock import post_unlock, settled

WRONG_PASSWORD = "not-the-password-7f3a"


class Scrape:
    """One answer of /metrics, parsed: `value(name, **labels)` of a sample."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in self.families.values()
            for s in family.samples
        }

    def value(self, name: str, **labels: str) -> float:
        return self.samples[(name, tuple(sorted(labels.items())))]

    def loads(self) -> dict[str, tuple[float, float]]:
        """/load's count and bytes by source."""
        return {
            source: (
                self.value("azaion_loader_resource_loads_total", source=source),
                self.value("azaion_loader_resource_load_bytes_total", source=source),
            )
            for source in ("cache", "cdn")
        }

    def labels(self) -> set[str]:
        return {value for key in self.samples for _, value in key[1]}


async def scrape(app: LocalApp) -> Scrape:
    async with app.session.get(app.url("/metrics")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        return Scrape(await resp.text())


async def login_status(app: LocalApp, password: str) -> int:
    async with app.session.post(
        app.url("/login"), json={"email": EMAIL, "password": password}
    ) as resp:
        return resp.status


def api(outcome: str) -> dict[str, str]:
    return {"remote": "api", "outcome": outcome}


async def test_idle_daemon_tells_its_version_state_images_and_cache(local: LocalApp) -> None:
    first = await scrape(local)
    assert first.value("azaion_loader_build_info", version=__version__) == 1
    assert first.value("azaion_loader_unlock_state", state="idle") == 1
    assert first.value("azaion_loader_unlock_state", state="ready") == 0
    assert first.value("azaion_loader_images_present") == 0
    assert first.value("azaion_loader_images_expected") == 7
    assert first.value("azaion_loader_cache_entries") == 0
    assert first.value("azaion_loader_cache_bytes") == 0
    assert first.value("azaion_loader_resource_loads_total", source="cdn") == 0
    assert first.value("azaion_loader_remote_calls_total", **api("ok")) == 0
    # Counters are counters, by Prometheus's naming rules.
    for name in ("unlock_attempts", "resource_loads", "remote_calls", "resource_upload_bytes"):
        assert first.families[f"azaion_loader_{name}"].type == "counter"
    assert first.families["azaion_loader_unlock_duration_seconds"].type == "summary"


async def test_values_move_with_a_refused_login_an_upload_a_cdn_load_and_a_cached_load(
    local: LocalApp, settings: Settings
) -> None:
    assert await login_status(local, WRONG_PASSWORD) == 401
    refused = await scrape(local)
    assert refused.value("azaion_loader_remote_calls_total", **api("refused")) == 1
    assert refused.value("azaion_loader_remote_calls_total", **api("ok")) == 0

    await login(local)
    data = os.urandom(200_000)
    assert (await upload(local, "net.onnx", data))[0] == 200
    uploaded = await scrape(local)
    assert uploaded.value("azaion_loader_resource_uploads_total") == 1
    assert uploaded.value("azaion_loader_resource_upload_bytes_total") == len(data)
    assert uploaded.value("azaion_loader_remote_calls_total", **api("ok")) >= 4
    assert uploaded.value("azaion_loader_remote_calls_total", remote="cdn", outcome="ok") == 1
    entry = settings.model_cache_dir / FOLDER / "net.onnx.big"
    assert uploaded.value("azaion_loader_cache_entries") == 1
    assert uploaded.value("azaion_loader_cache_bytes") == entry.stat().st_size

    entry.unlink()
    assert (await scrape(local)).value("azaion_loader_cache_entries") == 0
    status, body, _ = await load(local, "net.onnx")
    assert (status, body) == (200, data)
    from_cdn = await scrape(local)
    assert from_cdn.loads() == {"cache": (0, 0), "cdn": (1, len(data))}
    assert from_cdn.value("azaion_loader_remote_calls_total", remote="cdn", outcome="ok") == 2
    assert from_cdn.value("azaion_loader_cache_entries") == 1

    status, body, _ = await load(local, "net.onnx")
    assert (status, body) == (200, data)
    cached = await scrape(local)
    assert cached.loads() == {"cache": (1, len(data)), "cdn": (1, len(data))}
    assert cached.value("azaion_loader_remote_calls_total", remote="cdn", outcome="ok") == 2

    # Labels come from fixed sets; no secret, email or name is in the answer.
    assert cached.labels() <= {
        __version__,
        *("idle", "authenticating", "downloading_key", "decrypting"),
        *("loading_images", "ready", "error", "already-ready"),
        *("cache", "cdn", "api", "ok", "retried", "refused", "unreachable"),
    }
    for secret in (PASSWORD, WRONG_PASSWORD, EMAIL, "net.onnx"):
        assert secret not in cached.text
    assert local.redact(cached.text) == cached.text  # nor any token or fragment it has seen


async def test_retries_and_an_unreachable_remote_are_counted(
    local: LocalApp,
    emulator: RunningEmulator,
    make_local_app: Callable[[Settings], Any],
    with_settings: Callable[..., Settings],
    unused_tcp_port: int,
) -> None:
    emulator.emulator.add_rule(
        FaultRule(method="POST", path_prefix="/login", kind="status", status=503, count=2)
    )
    await login(local)
    retried = await scrape(local)
    assert retried.value("azaion_loader_remote_calls_total", **api("retried")) == 2
    assert retried.value("azaion_loader_remote_calls_total", **api("ok")) == 1

    away = await make_local_app(
        with_settings(resource_api_url=f"http://127.0.0.1:{unused_tcp_port}", api_retries=1)
    )
    assert await login_status(away, PASSWORD) == 503
    unreachable = await scrape(away)
    assert unreachable.value("azaion_loader_remote_calls_total", **api("retried")) == 1
    assert unreachable.value("azaion_loader_remote_calls_total", **api("unreachable")) == 1
    # Each app counts for itself.
    assert (await scrape(local)).value(
        "azaion_loader_remote_calls_total", **api("unreachable")
    ) == 0


@pytest.mark.docker
async def test_an_unlock_moves_attempts_duration_bytes_state_and_images(
    make_local_app: Callable[[Settings], Any],
    with_settings: Callable[..., Settings],
    private_dockerd: PrivateDockerd,
    image_archive: ArchiveInfo,
    no_stack_images: list[str],
) -> None:
    app: LocalApp = await make_local_app(
        with_settings(docker_host=private_dockerd.host, images_path=image_archive.path)
    )
    assert (await post_unlock(app, WRONG_PASSWORD))[0] == 200
    assert (await settled(app))["state"] == "error"
    failed = await scrape(app)
    assert failed.value("azaion_loader_unlock_attempts_total", outcome="wrong-credentials") == 1
    assert failed.value("azaion_loader_unlock_duration_seconds_count", outcome="error") == 1
    assert failed.value("azaion_loader_unlock_state", state="error") == 1
    assert failed.value("azaion_loader_remote_calls_total", **api("refused")) == 1

    assert (await post_unlock(app))[0] == 200
    final = await settled(app)
    assert final["state"] == "ready", final
    ready = await scrape(app)
    assert ready.value("azaion_loader_unlock_attempts_total", outcome="ready") == 1
    assert ready.value("azaion_loader_unlock_duration_seconds_count", outcome="ready") == 1
    assert ready.value("azaion_loader_unlock_duration_seconds_sum", outcome="ready") > 0
    assert ready.value("azaion_loader_unlock_bytes_total") == final["bytesDone"] > 0
    assert ready.value("azaion_loader_unlock_state", state="ready") == 1
    assert ready.value("azaion_loader_unlock_state", state="error") == 0
    assert ready.value("azaion_loader_images_present") == 7

    assert await post_unlock(app) == (200, {"state": "ready"})
    again = await scrape(app)
    assert again.value("azaion_loader_unlock_attempts_total", outcome="already-ready") == 1
    assert again.value("azaion_loader_unlock_duration_seconds_count", outcome="ready") == 1
    assert WRONG_PASSWORD not in again.text
    assert PASSWORD not in again.text


async def test_the_cli_writes_a_textfile_for_node_exporter(
    spawn: Spawn, settings: Settings, short_dir: Path
) -> None:
    await spawn(*loader_command(), "serve", env=daemon_env(settings))
    await wait_for(lambda: socket_answers(settings.socket_path), what="the daemon")
    textfiles = short_dir / "textfile"
    textfiles.mkdir()
    target = textfiles / "azaion-loader.prom"
    # An older file is replaced whole; the command's umask does not narrow the mode.
    target.write_text("stale 1\n")
    target.chmod(0o600)

    result = await cli("metrics", "--textfile", str(target), socket=settings.socket_path)
    assert (result.code, result.out, result.err) == (0, "", "")
    assert sorted(p.name for p in textfiles.iterdir()) == ["azaion-loader.prom"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    written = Scrape(target.read_text())
    assert written.value("azaion_loader_build_info", version=__version__) == 1
    assert written.value("azaion_loader_unlock_state", state="idle") == 1

    printed = await cli("metrics", socket=settings.socket_path)
    assert printed.code == 0
    assert Scrape(printed.out).value("azaion_loader_images_expected") == 7

    nowhere = await cli(
        "metrics", "--textfile", str(short_dir / "absent" / "x.prom"), socket=settings.socket_path
    )
    assert nowhere.code == 1
    assert "cannot write" in nowhere.err


def test_the_daemon_starts_without_prometheus_client() -> None:
    """Imported at the first scrape: the cold start by socket activation does not pay for it."""
    probe = (
        "import sys, loader.main, loader.server, loader.app, loader.routes, loader.cli; "
        "print('prometheus_client' in sys.modules)"
    )
    answer = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert answer.stdout.strip() == "False"


async def test_node_exporter_serves_the_textfile(
    spawn: Spawn, settings: Settings, short_dir: Path, unused_tcp_port: int
) -> None:
    """The README's way end to end, where node_exporter is installed (Debian's
    prometheus-node-exporter; ./dev does not install it, as it would start a service)."""
    exporter = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")
    if exporter is None:
        pytest.skip("no node_exporter here (Debian: apt-get install prometheus-node-exporter)")
    await spawn(*loader_command(), "serve", env=daemon_env(settings))
    await wait_for(lambda: socket_answers(settings.socket_path), what="the daemon")
    textfiles = short_dir / "textfile"
    textfiles.mkdir()
    target = textfiles / "azaion-loader.prom"
    assert (await cli("metrics", "--textfile", str(target), socket=settings.socket_path)).code == 0
    address = f"127.0.0.1:{unused_tcp_port}"
    await spawn(
        exporter,
        f"--web.listen-address={address}",
        "--collector.disable-defaults",
        "--collector.textfile",
        f"--collector.textfile.directory={textfiles}",
        env={"PATH": os.environ.get("PATH", "")},
    )

    async def served() -> str | None:
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://{address}/metrics") as resp,
            ):
                return await resp.text() if resp.status == 200 else None
        except aiohttp.ClientConnectionError:
            return None

    exported = Scrape(await wait_for(served, what="node_exporter"))
    assert exported.value("node_textfile_scrape_error") == 0, exported.text
    assert exported.value("azaion_loader_build_info", version=__version__) == 1
    assert exported.value("azaion_loader_unlock_state", state="idle") == 1
