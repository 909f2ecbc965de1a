"""Running `promptserve serve` as a real process in tests (benchmarks/server_process.py, with test failures
instead of exceptions)."""

import subprocess

import pytest

from benchmarks import server_process
from benchmarks.server_process import free_port, stop  # noqa: F401  (re-exported for the tests)


def spawn(env: dict, port: int, quiet: bool = True) -> subprocess.Popen:
    return server_process.spawn(env, port, stdout=subprocess.DEVNULL if quiet else subprocess.PIPE)


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    try:
        server_process.wait_ready(base, proc, timeout)
    except server_process.ServerFailed as exc:
        pytest.fail(str(exc))
