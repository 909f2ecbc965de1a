"""This machine's ceiling for the loaded model: its measured read bandwidth and matmul rate give the
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


def matmul_gflop_s(dtype: torch.dtype, budget_s: float = 1.0) -> float:
    """The rate of one square matmul in `dtype`, as large as fits the time budget (up to 2048): where a dtype
    has no native kernel (bf16 on an AVX2-only CPU is oneDNN's reference code, well under 1 GFLOP/s) a 2048
    matmul would take minutes; elsewhere the largest one gives the peak."""
    size = 256
    while True:
        a = torch.randn(size, size, dtype=dtype)
        b = torch.randn(size, size, dtype=dtype)
        t = time.perf_counter()
        a @ b
        once = time.perf_counter() - t
        if size >= 2048 or once * 8 > budget_s:  # the next size takes 8x as long
            break
        size *= 2
    reps = max(1, min(5, int(budget_s / max(once, 1e-6))))
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return reps * 2 * size ** 3 / (time.perf_counter() - t) / 1e9


def measure_machine(dtype: torch.dtype = torch.bfloat16) -> dict:
    """Read bandwidth (GB/s, a large tensor summed) and the matmul rate (GFLOP/s) the served dtype can reach:
    the larger of its own matmul and float32's, since on CPUs without native bf16 the kernels compute a bf16
    model's projections in float32 FMAs (kernels/small_batch_linear.cpp), and that rate is the ceiling."""
    x = torch.ones(256 * 1024 * 1024 // 4, dtype=torch.float32)  # 256 MiB: beyond every cache
    x.sum()
    t = time.perf_counter()
    for _ in range(5):
        x.sum()
    bandwidth = 5 * x.numel() * 4 / (time.perf_counter() - t) / 1e9
    rates = {str(d).removeprefix("torch."): matmul_gflop_s(d) for d in dict.fromkeys([dtype, torch.float32])}
    best = max(rates, key=rates.get)
    return {"read_gb_s": bandwidth, "matmul_gflop_s": rates[best], "matmul_dtype": best, "matmul_rates": rates}


def baseline_dtype(served: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype plain transformers runs in for a baseline: the served one, except bf16 on a CPU whose oneDNN
    has no native bf16 matmul (AVX-512 without BF16: emulated at under half its float32 speed; AVX2: reference
    code at ~1 GFLOP/s, a batch-64 baseline would take an hour), where transformers at its best is float32."""
    from app.model.loader import cpu_has_native_bf16

    if served == torch.bfloat16 and device.type == "cpu" and not cpu_has_native_bf16():
        return torch.float32
    return served


def load_baseline(settings, weight_bytes: int | None = None):
    """(the model plain transformers runs for these settings' baselines, the dtype the server runs them in),
    loaded once: in baseline_dtype, float32 only where twice the bf16 weights (weight_bytes, when known) fit
    the free memory; else in the served dtype, said (not native on such a CPU: slow)."""
    from app.model.loader import load_model, served_device_and_dtype
    from app.model.memory import available_bytes

    device, served = served_device_and_dtype(settings)
    dtype = baseline_dtype(served, device)
    room = available_bytes(device)
    if dtype != served and weight_bytes is not None and room is not None and 2 * weight_bytes > 0.9 * room:
        print(f"transformers in float32 needs {2 * weight_bytes / 1e9:.1f} GB, {room / 1e9:.1f} GB are free: it "
              f"runs in {served} instead (not native on this CPU: slow)", flush=True)
        dtype = served
    return load_model(settings.model_copy(update={"dtype": str(dtype).removeprefix("torch.")})), served


def describe(machine: dict) -> str:
    """The measured rates in one phrase, for the benchmarks' output."""
    rates = ", ".join(f"{d} {r:.0f}" for d, r in machine["matmul_rates"].items())
    return f"read {machine['read_gb_s']:.1f} GB/s, matmul GFLOP/s {rates} (ceiling from {machine['matmul_dtype']})"


def roofline(loaded, machine: dict, batch: int, dtype: torch.dtype | None = None) -> float:
    """Tokens per second the machine allows at this batch: the larger of reading every weight once per step
    and the step's matmul FLOPs (2 per weight per token), whichever bounds. dtype: the served one, where
    `loaded` is a copy in another (the baselines')."""
    params = sum(p.numel() for p in loaded.model.parameters())
    weight_bytes = sum(p.numel() * (dtype.itemsize if dtype else p.element_size()) for p in loaded.model.parameters())
    read_s = weight_bytes / (machine["read_gb_s"] * 1e9)
    flop_s = 2 * params * batch / (machine["matmul_gflop_s"] * 1e9)
    return batch / max(read_s, flop_s)
