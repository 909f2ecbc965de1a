"""Prebuilt kernels: an installation without a compiler loads the best level its CPU allows, built for its
torch and sources; anything else is never loaded."""

import json
import shutil
import subprocess
import sys

import pytest

from app.engine import kernels
from app.engine.kernels.prebuild import prebuild

ALL = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512_bf16", "avx2", "fma", "bmi2", "f16c",
       "movbe"}


def _manifest(tmp_path, key=None, levels=("avx512-bf16", "avx512", "avx2")):
    (tmp_path / "manifest.json").write_text(json.dumps({
        "key": key or kernels.sources_key(), "levels": {name: f"promptserve-kernels-{name}.so" for name in levels}}))
    return tmp_path


def test_the_best_level_the_cpu_allows_is_chosen(tmp_path):
    directory = _manifest(tmp_path)
    assert kernels.choose_prebuilt(directory, ALL).name == "promptserve-kernels-avx512-bf16.so"
    assert kernels.choose_prebuilt(directory, ALL - {"avx512_bf16"}).name == "promptserve-kernels-avx512.so"
    assert kernels.choose_prebuilt(directory, {"avx2", "fma", "bmi2", "f16c", "movbe"}).name == \
        "promptserve-kernels-avx2.so"
    assert kernels.choose_prebuilt(directory, {"sse4_2"}) is None  # an older CPU: torch's ops


def test_libraries_of_other_sources_or_torch_are_never_loaded(tmp_path):
    assert kernels.choose_prebuilt(_manifest(tmp_path, key="0" * 16), ALL) is None
    assert kernels.choose_prebuilt(tmp_path / "missing", ALL) is None


def check_bf16_without_avx512_bf16() -> None:
    """Run in a process that loaded the prebuilt "avx512" or "avx2" level: the kernels' bf16 paths without
    AVX-512 BF16 (what Skylake-SP to Ice Lake, or AVX2 CPUs, run), on any CPU that can run the level."""
    import torch

    k = kernels.load("/nonexistent")
    q, kv = torch.randn(2, 1, 2, 16), torch.randn(2, 1, 5, 16)  # float32 attention: the generic loop
    ref = torch.softmax(q @ kv.transpose(-1, -2) / 4, -1) @ kv
    assert torch.allclose(k.decode_attention(q, kv, kv, torch.tensor([4, 4]), 0.25), ref, atol=1e-5)
    assert k.bf16_linear is not None and k.small_batch_linear is not None and k.decode_layers is not None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(70, 576, generator=g).bfloat16()
    w = (torch.randn(300, 576, generator=g) * 0.05).bfloat16()
    y = k.bf16_linear(x, w)
    exact = x.double() @ w.double().T
    assert ((y.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-6).all()  # float32 sums, one bf16 rounding
    assert torch.equal(y[:4], k.small_batch_linear(x[:4], w)) and torch.equal(y[69], k.bf16_linear(x[69:], w)[0])
    q = torch.randn(3, 3, 3, 64, generator=g).bfloat16()  # SmolLM2's heads: 3 KV heads of 3 queries, 64 wide
    kv = torch.randn(3, 3, 40, 64, generator=g).bfloat16()
    lengths = torch.tensor([39, 10, 0])
    out = k.decode_attention(q, kv, kv, lengths, 0.125)
    for i, n in enumerate(lengths.tolist()):
        keys = kv[i, :, : n + 1].float()
        ref = torch.softmax(q[i].float() @ keys.transpose(-1, -2) * 0.125, -1) @ keys
        assert torch.allclose(out[i].float(), ref, atol=2e-2, rtol=2e-2)
    print("LEVEL OK")


@pytest.mark.skipif(shutil.which("g++") is None, reason="building the prebuilt library needs g++")
@pytest.mark.parametrize("level", ["avx512", "avx2"])
def test_levels_without_avx512_bf16_load_without_a_compiler_and_compute_right(tmp_path, level):
    """The levels built for CPUs without AVX-512 BF16 are what a process with no compiler loads there, and
    run right: bf16_linear (any rows, float32 FMAs) and decode attention, a row's projection the same at any
    batch size."""
    needs = next(flags for name, _, flags in kernels.PREBUILT_LEVELS if name == level)
    if not needs <= kernels.cpu_flags():
        pytest.skip(f"this CPU cannot run the {level} level")
    prebuild(tmp_path, shutil.which("g++"), only={level})
    code = ("import logging; logging.basicConfig(level=logging.INFO);"
            "from tests.engine.test_prebuilt_kernels import check_bf16_without_avx512_bf16 as c; c()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "CXX": "/nonexistent/g++",
                               "PROMPTSERVE_KERNELS_PREBUILT": str(tmp_path)})
    assert "LEVEL OK" in done.stdout, done.stderr[-2000:]
    assert f"the prebuilt promptserve-kernels-{level}.so" in done.stderr
