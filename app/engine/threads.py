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


def runnable_elsewhere(proc: Path = Path("/proc")) -> int | None:
    """Threads of other processes that are running or waiting for a CPU now: the system's runnable count
    (/proc/stat procs_running) less this process's running threads. None where /proc cannot tell."""
    try:
        running = next(int(line.split()[1]) for line in (proc / "stat").read_text().splitlines()
                       if line.startswith("procs_running"))
        mine = 0
        for task in (proc / "self" / "task").iterdir():
            try:
                # the state follows the parenthesised name, which may itself hold spaces
                if (task / "stat").read_text().rsplit(")", 1)[1].split()[0] == "R":
                    mine += 1
            except (OSError, IndexError):
                continue
        return max(0, running - mine)
    except (OSError, StopIteration, ValueError, IndexError):
        return None


class ThreadGovernor:
    """Fewer threads while other processes compete for the same cores, all of them again once they stop.

    Each decode step is a series of parallel regions that wait for their slowest thread: when a neighbour
    holds one of two cores, the thread that shares it is preempted for whole time slices and the other
    waits on it. Beside two busy processes on this 2-core machine, 64 clients kept 17% of their solo
    throughput with 2 threads and 46% with 1 (`promptserve bench --neighbours 2`, Intel Xeon). So the
    engine samples, between steps and a few times a second, how many threads of other processes are
    runnable (an average over the last samples), and runs max(1, usable - that) threads; it takes a
    thread back only after the neighbours have been gone for a while, so a burst does not flap it."""

    def __init__(self, usable: int, interval: float = 0.2, smoothing: float = 0.3, calm_seconds: float = 2.0,
                 sample=runnable_elsewhere, set_threads=None, clock=None):
        import time

        import torch

        self.usable = usable
        self.interval, self.smoothing, self.calm_seconds = interval, smoothing, calm_seconds
        self._sample, self._clock = sample, clock or time.monotonic
        self._set = set_threads or torch.set_num_threads
        self.threads = usable
        self.others = 0.0  # the runnable threads of other processes, averaged
        self._next = 0.0
        self._calm_since: float | None = None

    def between_steps(self) -> int:
        """Called by the engine between steps: adjust the thread count if it is time; returns it."""
        now = self._clock()
        if now < self._next:
            return self.threads
        self._next = now + self.interval
        seen = self._sample()
        if seen is None:
            return self.threads
        self.others += self.smoothing * (seen - self.others)
        # a neighbour counts once it is runnable most of the time (0.7 on average): a client parsing its
        # stream now and then does not take a thread away
        want = max(1, min(self.usable, self.usable - int(self.others + 0.3)))
        if want < self.threads:
            self._change(want, "other processes compete for the cores")
            self._calm_since = None
        elif want > self.threads:
            self._calm_since = self._calm_since if self._calm_since is not None else now
            if now - self._calm_since >= self.calm_seconds:
                self._change(want, "the cores are free again")
                self._calm_since = None
        else:
            self._calm_since = None
        return self.threads

    def _change(self, threads: int, why: str) -> None:
        log.info("engine threads %d -> %d: %s (%.1f runnable elsewhere)", self.threads, threads, why, self.others)
        self._set(threads)
        self.threads = threads
