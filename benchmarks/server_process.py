"""`promptserve serve` as a child process: the benchmark starts one, and so do the process-level tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx


class ServerFailed(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(env: dict, port: int, stdout=subprocess.DEVNULL, log_level: str | None = None) -> subprocess.Popen:
    """Start the server with env on top of this process's environment; stderr goes where stdout does
    (subprocess.DEVNULL, subprocess.PIPE, or None for this process's own output)."""
    args = [sys.executable, "-m", "app.cli", *(["--log-level", log_level] if log_level else []),
            "serve", "--port", str(port)]
    return subprocess.Popen(args, env={**os.environ, **env}, stdout=stdout, stderr=subprocess.STDOUT, text=True)


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Until GET /ready answers 200; ServerFailed if the process exits first or the time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise ServerFailed(f"server exited: {proc.stdout.read() if proc.stdout else proc.returncode}")
        try:
            if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise ServerFailed(f"server not ready within {timeout:.0f} s")


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM (the server drains), then kill if it has not exited within timeout."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
