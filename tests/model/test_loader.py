"""The dtype `auto` chooses on a CPU, by its flags and whether the native bf16 kernels run there."""

import pytest
import torch

from app.model import loader

AVX512 = {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma"}
CPU = torch.device("cpu")


@pytest.mark.parametrize("flags,kernels,expected", [
    (AVX512 | {"avx512_bf16"}, False, torch.bfloat16),  # native bf16 matmuls (AMD Zen 4, Cooper Lake on)
    ({"avx2", "fma", "amx_bf16"}, False, torch.bfloat16),
    (AVX512, True, torch.bfloat16),  # Ice Lake with the native kernels: bf16_linear
    (AVX512, False, torch.float32),  # Ice Lake without them: oneDNN's emulated bf16 is slower than float32
    ({"avx2", "fma"}, True, torch.bfloat16),  # AVX2 only (Zen 2-3): bf16_linear's 8-lane build
    ({"avx2", "fma"}, False, torch.float32),  # oneDNN's bf16 there is reference code
    (set(), False, torch.float32),
])
def test_auto_dtype_on_cpu(monkeypatch, flags, kernels, expected):
    monkeypatch.setattr(loader.kernels, "cpu_flags", lambda: flags)
    asked = []

    def bf16_kernels():
        asked.append(True)
        return kernels
    assert loader.choose_dtype("auto", CPU, bf16_kernels) == expected
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        assert not asked  # a CPU with native bf16 does not build the kernels to decide


def test_an_asked_dtype_is_kept_and_an_unknown_one_refused():
    assert loader.choose_dtype("float32", CPU, lambda: True) == torch.float32
    assert loader.choose_dtype("bf16", CPU) == torch.bfloat16
    with pytest.raises(ValueError, match="PROMPTSERVE_DTYPE='int3'"):
        loader.choose_dtype("int3", CPU)
