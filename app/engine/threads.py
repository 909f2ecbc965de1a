"""How many threads the model's CPU work may use: what this process may actually run on.

torch sizes its OpenMP team from the CPUs it can see, which in a container is the node's cores, not the
pod's: a pod limited to 2 CPUs on a 64-core node ran 64 threads that the kernel throttled in turn, each
parallel region waiting on its slowest thread. The usable count is the affinity mask (taskset, cpusets),
capped by the cgroup's CPU quota (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us`): a quota of 2.5 CPUs gives
2 threads, never more threads than whole CPUs the quota pays for.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP = Path("/sys/fs/cgroup")


def cgroup_cpu_quota(root: Path = CGROUP) -> float | None:
    """CPUs the cgroup's quota allows (e.g. 2.5), None when unlimited or unknown."""
    v2 = root / "cpu.max"
    try:
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        quota_file, period_file = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"
        if quota_file.is_file():
            quota = int(quota_file.read_text())
            return None if quota <= 0 else quota / int(period_file.read_text())
    except (OSError, ValueError):
        return None
    return None


def usable_cpus(root: Path = CGROUP) -> int:
    """Whole CPUs this process may use: its affinity mask, capped by the cgroup quota; at least 1."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        count = os.cpu_count() or 1
    quota = cgroup_cpu_quota(root)
    if quota is not None:
        count = min(count, max(1, math.floor(quota)))
    return max(1, count)


def size_threads(requested: int = 0) -> int:
    """Set torch's intra-op threads to `requested`, or (0) to the usable CPUs; returns the count."""
    import torch

    count = requested if requested > 0 else usable_cpus()
    if count != torch.get_num_threads():
        log.info("torch threads: %d -> %d (%s)", torch.get_num_threads(), count,
                 "PROMPTSERVE_THREADS" if requested > 0 else "the CPUs this process may use: affinity, cgroup quota")
        torch.set_num_threads(count)
    return count


class ThreadGovernor:
    """Fewer threads while other processes compete for the same cores, all of them again once they stop.

    Each decode step is a series of parallel regions that wait for their slowest thread: when a neighbour
    holds one of two cores, the thread that shares it is preempted for whole time slices and the other
    waits on it. Beside two busy processes on this 2-core machine, 64 clients kept 17% of their solo
    throughput with 2 threads and 46% with 1 (`promptserve bench --neighbours 2`, Intel Xeon).

    The signal is the share of the CPU the process gets while the engine is busy: CPU seconds over wall
    seconds and threads, measured across steps run back to back (an idle engine's threads sleep, which says
    nothing). Alone, the threads get nearly all of it (a client on the same machine takes a little); beside
    a neighbour per core they get half, and 2/3 with one thread fewer. Below `low` the engine gives up a
    thread; with fewer threads than usable, above `high` for `calm_seconds` it takes one back."""

    def __init__(self, usable: int, window: float = 0.5, low: float = 0.65, high: float = 0.9,
                 calm_seconds: float = 2.0, cpu_clock=None, wall_clock=None, set_threads=None):
        import time

        import torch

        self.usable = usable
        self.window, self.low, self.high, self.calm_seconds = window, low, high, calm_seconds
        self._cpu, self._wall = cpu_clock or time.process_time, wall_clock or time.monotonic
        self._set = set_threads or torch.set_num_threads
        self.threads = usable
        self.share = 1.0  # the last window's CPU share per thread
        self._start: tuple[float, float] | None = None  # (wall, cpu) where the busy window began
        self._calm_since: float | None = None

    def idle(self) -> None:
        """The engine waited for work: the busy window ends without a measurement."""
        self._start = None

    def between_steps(self) -> int:
        """Called by the engine before each step it runs; adjusts the threads when a window is complete."""
        wall, cpu = self._wall(), self._cpu()
        if self._start is None:
            self._start = (wall, cpu)
            return self.threads
        elapsed = wall - self._start[0]
        if elapsed < self.window:
            return self.threads
        self.share = (cpu - self._start[1]) / (elapsed * self.threads)
        self._start = (wall, cpu)
        if self.share < self.low and self.threads > 1:
            self._change(self.threads - 1, "other processes hold the cores")
            self._calm_since = None
        elif self.share > self.high and self.threads < self.usable:
            self._calm_since = self._calm_since if self._calm_since is not None else wall
            if wall - self._calm_since >= self.calm_seconds:
                self._change(self.threads + 1, "the cores are free again")
                self._calm_since = None
        else:
            self._calm_since = None
        return self.threads

    def _change(self, threads: int, why: str) -> None:
        log.info("engine threads %d -> %d: %s (CPU share per thread %.2f)", self.threads, threads, why, self.share)
        self._set(threads)
        self.threads = threads
        self._start = None  # the next window measures the new count
