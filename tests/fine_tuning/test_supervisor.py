"""The training worker `serve` starts beside itself: its priority from the first instruction, restarts, stop."""

import os
import sys
import time

from fine_tuning.supervisor import WorkerSupervisor


def _wait_for(path, timeout=20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{path} was not written")


def test_the_worker_runs_at_its_low_priority_from_its_first_instruction(tmp_path):
    """Its imports (torch, ~1.5 s of CPU) must not compete with serving at the server's priority."""
    seen = tmp_path / "nice"
    code = f"import os, time\nopen({str(seen)!r}, 'w').write(str(os.nice(0)))\ntime.sleep(60)\n"
    supervisor = WorkerSupervisor([sys.executable, "-c", code], nice=19)
    supervisor.start()
    try:
        assert int(_wait_for(seen)) == max(19, os.nice(0))
    finally:
        supervisor.stop(timeout=5)
    assert supervisor.proc.poll() is not None  # stopped with the server


def test_a_worker_that_dies_is_started_again(tmp_path, monkeypatch):
    monkeypatch.setattr("fine_tuning.supervisor.RESTART_DELAY_S", 0.1)
    runs = tmp_path / "runs"
    code = f"open({str(runs)!r}, 'a').write('x')\n"  # exits at once, as a crash would
    supervisor = WorkerSupervisor([sys.executable, "-c", code])
    supervisor.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(runs.read_text() if runs.exists() else "") < 2:
            time.sleep(0.05)
        assert len(runs.read_text()) >= 2
    finally:
        supervisor.stop(timeout=5)
