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


@pytest.mark.skipif(shutil.which("g++") is None, reason="building the prebuilt library needs g++")
def test_a_prebuilt_library_loads_without_a_compiler(tmp_path):
    """The portable AVX2 level, built here, is what a process with no compiler loads and runs."""
    prebuild(tmp_path, shutil.which("g++"), only={"avx2"})
    code = ("import logging, torch; logging.basicConfig(level=logging.INFO);"
            "from app.engine import kernels; k = kernels.load('/nonexistent');"
            "q = torch.randn(2, 1, 2, 16); kv = torch.randn(2, 1, 5, 16);"
            "ref = torch.softmax(q @ kv.transpose(-1, -2) / 4, -1) @ kv;"
            "out = k.decode_attention(q, kv, kv, torch.tensor([4, 4]), 0.25);"
            "print('LOADED', torch.allclose(out, ref, atol=1e-5))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "CXX": "/nonexistent/g++",
                               "PROMPTSERVE_KERNELS_PREBUILT": str(tmp_path)})
    assert "LOADED True" in done.stdout, done.stderr[-2000:]
    assert "the prebuilt promptserve-kernels-avx2.so" in done.stderr
