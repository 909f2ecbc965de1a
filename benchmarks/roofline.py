"""This machine's ceiling for the loaded model: its measured read bandwidth and bf16 matmul rate give the
most tokens per second a decode step could reach at a batch size (every weight read once per step, and 2
FLOPs per weight per token, whichever bounds). Used by `promptserve bench` and benchmarks.step_profile.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def measure_machine() -> dict:
    """Read bandwidth (GB/s, a large tensor summed) and bf16 matmul rate (GFLOP/s) on this machine."""
    x = torch.ones(256 * 1024 * 1024 // 4, dtype=torch.float32)  # 256 MiB: beyond every cache
    x.sum()
    t = time.perf_counter()
    for _ in range(5):
        x.sum()
    bandwidth = 5 * x.numel() * 4 / (time.perf_counter() - t) / 1e9
    a = torch.randn(2048, 2048, dtype=torch.bfloat16)
    b = torch.randn(2048, 2048, dtype=torch.bfloat16)
    a @ b
    t = time.perf_counter()
    for _ in range(5):
        a @ b
    gflops = 5 * 2 * 2048 ** 3 / (time.perf_counter() - t) / 1e9
    return {"read_gb_s": bandwidth, "bf16_gflop_s": gflops}


def roofline(loaded, machine: dict, batch: int) -> float:
    """Tokens per second the machine allows at this batch: the larger of reading every weight once per step
    and the step's matmul FLOPs (2 per weight per token), whichever bounds."""
    params = sum(p.numel() for p in loaded.model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    read_s = weight_bytes / (machine["read_gb_s"] * 1e9)
    flop_s = 2 * params * batch / (machine["bf16_gflop_s"] * 1e9)
    return batch / max(read_s, flop_s)
