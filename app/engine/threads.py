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
