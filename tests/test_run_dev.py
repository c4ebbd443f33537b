"""`./dev run` as the quickstart has it: the commands it prints, run as printed, find nothing
wrong (doctor), unlock the demo stack into its engine and round-trip a resource; a stop
leaves no process behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

from tests.conftest import skip_or_fail
from tests.dockerd import PrivateDockerd, present_images, processes_mentioning, stack_tags
from tests.polling import poll

REPO = Path(__file__).resolve().parent.parent


def _blocks(text: str) -> dict[str, list[str]]:
    """The printed commands, by the heading line before them, continuation lines joined."""
    blocks: dict[str, list[str]] = {}
    heading = ""
    pending = ""
    for line in text.splitlines():
        if not line.startswith("  "):
            if line.strip():
                heading = line.strip()
            continue
        command = pending + line.strip()
        if command.endswith("\\"):
            pending = command[:-1] + " "
            continue
        pending = ""
        if not command.startswith("#"):
            blocks.setdefault(heading, []).append(command)
    return blocks


def _shell(command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", "-c", command], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_printed_commands_unlock_the_demo_stack_and_round_trip_a_resource(tmp_path: Path) -> None:
    why = PrivateDockerd.available()
    if why is not None:
        skip_or_fail(f"the demo's engine: {why}")
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "DOCKER_HOST"} | {"RUN_DIR": str(run)}
    proc = subprocess.Popen(
        [str(REPO / "scripts" / "run-dev")],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    printed: list[str] = []
    done = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            printed.append(line)
            if line.startswith("Ctrl-C stops"):
                done.set()
        done.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    engine_root: Path | None = None
    try:
        assert done.wait(300), "".join(printed)
        text = "".join(printed)
        found = re.search(r"in unix://(\S+)/docker\.sock\)", text)
        assert found, text
        engine_root = Path(found.group(1))
        host = f"unix://{engine_root}/docker.sock"
        assert present_images(host, stack_tags("latest")) == []
        blocks = _blocks(text)
        tries = next(b for heading, b in blocks.items() if heading.startswith("Daemon socket"))
        unlock = next(b for heading, b in blocks.items() if heading.startswith("Unlock the demo"))
        roundtrip = next(b for heading, b in blocks.items() if heading.startswith("Upload"))

        poll(lambda: proc.poll() is not None or (run / "loader.sock").exists(), 30, 0.05)
        assert proc.poll() is None, "".join(printed)
        assert (run / "loader.sock").exists(), "".join(printed)
        for command in tries:  # health, status, doctor (exit 1 on a failed check), metrics
            answer = _shell(command)
            assert answer.returncode == 0, (command, answer)
        assert any(" doctor " in command for command in tries), tries

        started = time.monotonic()
        answer = _shell(unlock[0])
        took = time.monotonic() - started
        assert answer.returncode == 0, answer
        assert "ready: 7 images loaded" in answer.stdout + answer.stderr, answer
        print(f"unlock of the demo stack: {took:.1f} s")
        assert present_images(host, stack_tags("latest")) == stack_tags("latest")

        answer = _shell(" && ".join(roundtrip))
        assert answer.returncode == 0, answer
        assert answer.stdout.strip().endswith("same"), answer
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        reader.join(10)
        assert proc.stdout is not None
        proc.stdout.close()
    assert proc.returncode == 130, "".join(printed)
    if engine_root is not None:
        assert processes_mentioning(engine_root) == []
        assert not engine_root.exists()
