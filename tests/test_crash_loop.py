"""A daemon that crashes in a loop stops being restarted (systemd.Runs), and a clean exit or a
start after the stop runs it again. The booted system test runs it under systemd itself."""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from pathlib import Path

import pytest

from loader.settings import Settings
from loader.systemd import CRASH_LOOP_RUNS, CRASH_LOOP_WINDOW, Runs
from tests.conftest import Spawn, daemon_env, loader_command, session_for, skip_or_fail


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_quick_crashes_in_a_row_stop_the_loop_and_the_next_start_tries_once(
    tmp_path: Path,
) -> None:
    clock = Clock()
    for crashes in range(CRASH_LOOP_RUNS):
        runs = Runs(tmp_path, clock)
        assert runs.start(), crashes
        assert runs.crashes == crashes
        clock.now += 5.5  # crashed at once, restarted RestartSec= later
    stopper = Runs(tmp_path, clock)
    assert not stopper.start()
    assert stopper.crashes == CRASH_LOOP_RUNS
    # The next start (a request) runs it, and a quick crash then stops it again at once.
    clock.now += 300
    probe = Runs(tmp_path, clock)
    assert probe.start()
    clock.now += 5.5
    assert not Runs(tmp_path, clock).start()


def test_a_clean_exit_or_a_long_run_ends_the_count(tmp_path: Path) -> None:
    clock = Clock()
    for _ in range(CRASH_LOOP_RUNS - 1):
        assert Runs(tmp_path, clock).start()
        clock.now += 5.5
    runs = Runs(tmp_path, clock)
    assert runs.start()
    runs.clean()
    assert not (tmp_path / "runs").exists()
    assert Runs(tmp_path, clock).start()
    # A run that crashes after a minute is one crash, not one more in a loop.
    clock.now += CRASH_LOOP_WINDOW + 1
    later = Runs(tmp_path, clock)
    assert later.start()
    assert later.crashes == 1


def test_no_runtime_directory_keeps_nothing_and_never_stops(tmp_path: Path) -> None:
    runs = Runs.from_env({})
    for _ in range(CRASH_LOOP_RUNS * 2):
        assert runs.start()
    assert list(tmp_path.iterdir()) == []


def test_an_unreadable_record_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "runs").write_text("running yesterday\n")
    runs = Runs(tmp_path, Clock())
    assert runs.start()
    assert runs.crashes == 0
    assert "not a record of the last run" in caplog.text
    assert (tmp_path / "runs").read_text().startswith("running 1000.000 0")


async def _health_from_activated(
    spawn: Spawn, settings: Settings, sock: Path, runtime: Path
) -> tuple[asyncio.subprocess.Process, int, dict[str, str]]:
    """Start the daemon as systemd would (RUNTIME_DIRECTORY set), and ask /health on its socket."""
    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        skip_or_fail("systemd-socket-activate is missing (Debian's systemd package)")
    assert tool is not None
    env = daemon_env(settings, RUNTIME_DIRECTORY=str(runtime))
    forwarded = [
        f"-E{name}={env[name]}" for name in sorted(env) if name.isupper() and name != "PATH"
    ]
    proc = await spawn(tool, "-l", str(sock), *forwarded, *loader_command(), "serve", env=env)
    assert proc.stderr is not None
    line = await asyncio.wait_for(proc.stderr.readline(), 10)
    assert b"Listening on" in line, line
    async with session_for(sock) as session, session.get("http://loader/health") as resp:
        return proc, resp.status, await resp.json()


async def test_the_start_after_a_loop_answers_503_and_exits_75_then_a_start_serves(
    spawn: Spawn, settings: Settings, short_dir: Path, tmp_path: Path
) -> None:
    """A real daemon under socket activation: the waiting request is told why (so nothing is
    left queued to start it again), and the following start serves and, once stopped
    cleanly, leaves no record."""
    runtime = tmp_path / "run"
    runtime.mkdir()
    # What CRASH_LOOP_RUNS quick crashes leave: the last run started a moment ago.
    (runtime / "runs").write_text(f"running {time.monotonic():.3f} {CRASH_LOOP_RUNS - 1}\n")
    proc, status, answer = await _health_from_activated(
        spawn, settings, short_dir / "a.sock", runtime
    )
    assert status == 503, answer
    assert answer["code"] == "crash-loop", answer
    assert f"crashed {CRASH_LOOP_RUNS} times in a row" in answer["detail"], answer
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 75, err
    assert (runtime / "runs").read_text() == f"stopped {CRASH_LOOP_RUNS}\n"

    proc, status, answer = await _health_from_activated(
        spawn, settings, short_dir / "b.sock", runtime
    )
    assert status == 200, answer
    assert (runtime / "runs").read_text().split()[::2] == ["running", str(CRASH_LOOP_RUNS)]
    proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err
    assert f"starting after {CRASH_LOOP_RUNS} crash(es) in a row".encode() in err, err
    assert not (runtime / "runs").exists()
