"""The training worker `promptserve serve` starts beside itself: a child process, started again when it dies
(a crash, the OOM killer), stopped with the server."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
import subprocess
import sys
import threading

log = logging.getLogger("promptserve.worker")
RESTART_DELAY_S = 5.0


def renice(nice: int) -> None:
    """Raise this process's nice value to `nice` (never lower it: an unprivileged process may not)."""
    if nice:
        os.nice(max(0, nice - os.nice(0)))


def _child_setup(nice: int) -> None:
    """In the child, before exec: Linux sends it SIGTERM when the server process dies, even by SIGKILL, so
    no orphaned worker keeps training (its job goes back to the queue); and its CPU priority is lowered
    now, not once it has imported its modules: a worker importing torch at the server's priority took
    1.5 s of CPU from the first requests, whose decode steps ran at 20-25 ms a token instead of 12-14
    (one client, SmolLM2 bf16, AMD EPYC 2 cores)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    renice(nice)


class WorkerSupervisor:
    def __init__(self, argv: list[str] | None = None, nice: int = 0):
        self.argv = argv or [sys.executable, "-m", "app.cli", "worker"]
        self.nice = nice  # the child's CPU priority from its first instruction (PROMPTSERVE_TRAINING_NICE)
        self.proc: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # a stop() never misses a child that is being started
        self._thread = threading.Thread(target=self._keep_running, name="training-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _keep_running(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                if self._stopping.is_set():
                    return
                self.proc = subprocess.Popen(self.argv, preexec_fn=functools.partial(_child_setup, self.nice))
            code = self.proc.wait()
            if self._stopping.is_set():
                return
            log.warning("the training worker exited (%s); starting it again in %.0f s", code, RESTART_DELAY_S)
            self._stopping.wait(RESTART_DELAY_S)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (its job is queued again), then kill after timeout."""
        with self._lock:
            self._stopping.set()
            proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._thread.join(timeout)
