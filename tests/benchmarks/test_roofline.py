"""The roofline `make bench` prints: reading the weights bounds a small batch, the matmul FLOPs a large one."""

import torch

from app.model import loader
from benchmarks.roofline import baseline_dtype, roofline


def test_the_ceiling_is_bandwidth_bound_at_batch_1_and_compute_bound_at_a_large_batch(tiny):
    params = sum(p.numel() for p in tiny.model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in tiny.model.parameters())
    machine = {"read_gb_s": 20.0, "matmul_gflop_s": 1000.0}
    assert roofline(tiny, machine, 1) == 1 / (weight_bytes / 20e9)  # one weight read per step
    big = 1_000_000
    assert abs(roofline(tiny, machine, big) - 1000e9 / (2 * params)) < 1e-6 * roofline(tiny, machine, big)
    assert roofline(tiny, machine, 64) <= 64 * roofline(tiny, machine, 1)


def test_transformers_baselines_run_float32_where_bf16_matmuls_are_not_native(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(loader.kernels, "cpu_flags", lambda: {"avx2", "fma"})  # AVX2 only: reference bf16
    assert baseline_dtype(torch.bfloat16, cpu) == torch.float32
    assert baseline_dtype(torch.float32, cpu) == torch.float32
    assert baseline_dtype(torch.bfloat16, torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(loader.kernels, "cpu_flags", lambda: {"avx2", "fma", "amx_bf16"})
    assert baseline_dtype(torch.bfloat16, cpu) == torch.bfloat16

