"""What memory the process may still use, and what a checkpoint's weights take: for the KV cache's default
budget (app/engine/kv_cache.py) and for a training worker deciding whether it can load the base beside a
server (fine_tuning/runner.py)."""

from __future__ import annotations

import math
from pathlib import Path

import torch


def available_bytes(device: torch.device) -> int | None:
    """Memory this process may still take: CPU, MemAvailable capped by the cgroup's memory.max less what the
    cgroup uses (a container's limit, which /proc/meminfo does not show); GPU, its free memory. None when
    the machine does not say."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        used = int(open("/sys/fs/cgroup/memory.current").read())
        if limit != "max":
            room = max(int(limit) - used, 0)
            available = room if available is None else min(available, room)
    except (OSError, ValueError):
        pass
    return available


def checkpoint_weight_bytes(checkpoint: Path, dtype: torch.dtype) -> int | None:
    """The bytes of a checkpoint's floating-point weights once held in dtype, from its safetensors headers
    (nothing else is read); None without safetensors files."""
    from app.model.loader import SAFETENSORS_DTYPES, safetensors_header

    files = sorted(Path(checkpoint).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        with path.open("rb") as f:
            header, _ = safetensors_header(f)
        for info in header.values():
            if info["dtype"] in SAFETENSORS_DTYPES:  # what the loader converts to dtype
                total += math.prod(info["shape"]) * dtype.itemsize
    return total
