"""Running `promptserve serve` as a real process in tests (benchmarks/server_process.py, with test failures
instead of exceptions)."""

import subprocess
from contextlib import contextmanager
from typing import Iterator

import pytest

from benchmarks import server_process
from benchmarks.server_process import free_port, stop  # noqa: F401  (re-exported for the tests)


def spawn(env: dict, port: int, quiet: bool = True) -> subprocess.Popen:
    return server_process.spawn(env, port, stdout=subprocess.DEVNULL if quiet else subprocess.PIPE)


@contextmanager
def serving(env: dict) -> Iterator[str]:
    """A `promptserve serve` process with env on a free port, ready; its base URL. Stopped (SIGTERM) after."""
    port = server_process.free_port()
    base = f"http://127.0.0.1:{port}"
    proc = spawn(env, port)
    try:
        wait_ready(base, proc)
        yield base
    finally:
        stop(proc)


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    try:
        server_process.wait_ready(base, proc, timeout)
    except server_process.ServerFailed as exc:
        pytest.fail(str(exc))
