"""Native CPU kernels, compiled on first use with the machine's C++ compiler and cached.

- `decode_attention` (decode_attention.cpp) replaces torch's SDPA for the one-token decode step on CPU:
  ~4x faster there at batch 64 in bfloat16 (see the .cpp file), and a row's result never depends on its
  batch.
- `small_batch_linear` (small_batch_linear.cpp): the bfloat16 projections of a decode step of 1-2 rows,
  a matrix-vector product bound by reading the weights, ~1.5x faster than oneDNN's packed matmul there;
  on CPUs with AVX-512 or AVX2 (None elsewhere: the packed matmul stays).
- `bf16_linear` (same file): bfloat16 projections of any number of rows in float32 FMAs, on CPUs without
  AVX-512 BF16 that have AVX-512 (Skylake-SP to Ice Lake) or AVX2, where oneDNN emulates bf16 at well under
  its float32 speed: on an Ice Lake the bf16 model is then served faster than float32 at batch 64 and 2.9x
  faster at batch 1, in half the memory (vdpbf16ps' arithmetic, avx512.h).
- `add_rms_norm` (add_rms_norm.cpp): a residual add and the next RMSNorm in one pass, bfloat16 (five torch
  operations, each mostly dispatch overhead at decode sizes).
- `rotary_cache_write` (rotary_cache_write.cpp): rotary embedding and KV-cache write of a decode step's or
  a prefill's tokens in one pass, bit-identical to transformers' rotary (float32 and bfloat16).
- `decode_layers` (decode_layers.cpp): every decoder layer of a 1-2 token bfloat16 decode step in one op,
  the kernels above called from C++ in the layer-by-layer path's order (bit-identical to it): at batch 1
  the operations dispatched from Python one by one cost ~1.7 ms of a 13.9 ms step (AMD EPYC). It also runs
  speculative decoding's checks (up to 4 tokens, several of one row: speculation.py).

Their parallel regions hand out chunks that the threads claim as they go (parallel.h), so a thread the OS
preempts on shared cores does not hold up the others; a chunk's result does not depend on its thread.

They are one library. An image or an installation without a compiler carries it prebuilt for the x86
levels it may meet (`python -m app.engine.kernels.prebuild DIR`, run when the image is built): at start the
best level this CPU's flags allow is loaded, when it was built for this torch and these sources
(PREBUILT_LEVELS; the directory is PROMPTSERVE_KERNELS_PREBUILT, default `prebuilt/` beside this file).
Otherwise the library is built for this CPU (-march=native) into the cache directory, keyed by the
sources, torch's version, the compiler and the CPU's feature flags, so a changed CPU or torch builds afresh
and a restart reuses the build (about 20 s once). With neither, or when the build fails, the engine keeps
torch's SDPA and oneDNN and says so in the log: the results are the same to float rounding, only slower.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name)
           for name in ("decode_attention.cpp", "small_batch_linear.cpp", "add_rms_norm.cpp",
                        "rotary_cache_write.cpp", "decode_layers.cpp")]
# included by the sources: part of the build's key
HEADERS = [Path(__file__).with_name(name) for name in ("avx512.h", "avx2.h", "kernels.h", "parallel.h")]
# -ffp-contract=off: no fused multiply-adds the source does not ask for, so elementwise kernels round as
# torch's own operations do (rotary_cache_write is bit-identical to transformers' rotary, float32 and bf16)
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=c++20"]
# Prebuilt levels, best first: (name, the -march flags that replace -march=native, the /proc/cpuinfo flags a
# CPU needs for it). AMX needs no level of its own: the kernels do not use it (oneDNN's projections do).
PREBUILT_LEVELS = [
    ("avx512-bf16", ["-march=x86-64-v4", "-mavx512bf16"],
     {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512_bf16", "avx2", "fma", "bmi2"}),
    ("avx512", ["-march=x86-64-v4"],
     {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx2", "fma", "bmi2"}),
    ("avx2", ["-march=x86-64-v3"], {"avx2", "fma", "bmi2", "f16c", "movbe"}),
]
_UNTRIED = object()
_loaded: bool | object = _UNTRIED  # this process's outcome: the library loaded, or not (SDPA, oneDNN)


def _cpu_flags_line() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def cpu_flags() -> set[str]:
    """This CPU's feature flags (/proc/cpuinfo; empty where it cannot be read)."""
    line = _cpu_flags_line()
    return set(line.split(":", 1)[1].split()) if ":" in line else set()


def compiler() -> str | None:
    """The C++ compiler the kernels are built with: $CXX, else g++ or c++ on the PATH; None if there is none."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _build(compiler: str, target: Path, march: list[str] | None = None, sources: list[Path] | None = None) -> None:
    """The library from `sources` (default: these kernels' SOURCES) into `target`."""
    from torch.utils.cpp_extension import include_paths

    lib = Path(torch.__file__).parent / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        flags = [f for f in FLAGS if f != "-march=native"] + march if march else FLAGS
        cmd = [compiler, *flags, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *[f"-I{p}" for p in include_paths()],
               *[str(source) for source in sources or SOURCES], "-o", str(out), f"-L{lib}", "-lc10",
               "-ltorch_cpu", f"-Wl,-rpath,{lib}"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-2000:])
        os.replace(out, target)  # atomic: another process building the same key never sees half a file


@dataclass(frozen=True)
class NativeKernels:
    """The native ops usable here; None where torch's own op is used instead."""
    # (q [n, kvh, g, d], k, v [n, kvh, W, d] views, lengths [n] int64, scale) -> [n, kvh, g, d]
    decode_attention: Callable | None = None
    # (x [m <= 4, k], w [n, k]) -> [m, n], bfloat16; on CPUs with AVX-512 or AVX2
    small_batch_linear: Callable | None = None
    # (x [m, k], w [n, k]) -> [m, n], bfloat16 computed in float32, any m; only on CPUs without AVX-512 BF16
    # (AVX-512 or AVX2), whose oneDNN emulates bf16 matmuls at a fraction of its float32 speed
    bf16_linear: Callable | None = None
    # (x, delta [.., c], weight [c], eps) -> (x + delta, RMSNorm(x + delta)), bfloat16
    add_rms_norm: Callable | None = None
    # (qkv [n, (h + 2 kvh) d], cos, sin [n, d], k_cache, v_cache [R, kvh, L, d], rows, at [n], h, kvh)
    #   -> q [n, h, d] rotated; k rotated and v written into the cache at (rows, at)
    rotary_cache_write: Callable | None = None
    # every decoder layer of a 1-4 token bfloat16 decode step in one op, calling the kernels above from C++
    # (DecoderForward._native_decode: its arguments); only with small_batch_linear
    decode_layers: Callable | None = None


def load(cache_dir: Path | str) -> NativeKernels:
    """The native kernels, built if needed; all None when no native build is possible here."""
    if not _library(Path(cache_dir)):
        return NativeKernels()
    ops = torch.ops.promptserve
    small = ops.small_batch_linear_supported()  # built with AVX-512 or AVX2: the decode op calls that kernel
    return NativeKernels(decode_attention=ops.decode_attention,
                         small_batch_linear=ops.small_batch_linear if small else None,
                         bf16_linear=ops.bf16_linear if ops.bf16_linear_supported() else None,
                         add_rms_norm=ops.add_rms_norm, rotary_cache_write=ops.rotary_cache_write,
                         decode_layers=ops.decode_layers if small else None)


def _library(cache_dir: Path) -> bool:
    """Build (if needed) and load the kernels' library. Decided once per process: a failed build is not
    retried by every engine made afterwards."""
    global _loaded
    if _loaded is _UNTRIED:
        _loaded = _load(cache_dir)
    return bool(_loaded)


def sources_key() -> str:
    """What a build depends on besides the compiler and the target: the sources and torch's version."""
    return hashlib.sha256("\n".join([*(source.read_text() for source in SOURCES + HEADERS),
                                     torch.__version__]).encode()).hexdigest()[:16]


def prebuilt_dir() -> Path:
    return Path(os.environ.get("PROMPTSERVE_KERNELS_PREBUILT") or Path(__file__).with_name("prebuilt"))


def choose_prebuilt(directory: Path, cpu_flags: set[str]) -> Path | None:
    """The best prebuilt library this CPU can run, built from these sources for this torch; None if none."""
    manifest = directory / "manifest.json"
    if not manifest.is_file():
        return None
    built = json.loads(manifest.read_text())
    if built.get("key") != sources_key():
        log.warning("prebuilt kernels in %s are for other sources or another torch: not used", directory)
        return None
    for name, _, needs in PREBUILT_LEVELS:
        if name in built.get("levels", {}) and needs <= cpu_flags:
            return directory / built["levels"][name]
    return None


def _load(cache_dir: Path) -> bool:
    prebuilt = choose_prebuilt(prebuilt_dir(), cpu_flags())
    if prebuilt is not None:
        try:
            torch.ops.load_library(str(prebuilt))
            log.info("native kernels: the prebuilt %s", prebuilt.name)
            return True
        except Exception as exc:
            log.warning("prebuilt kernels %s did not load (%s): building them here if a compiler is", prebuilt,
                        str(exc)[:300])
    cxx = compiler()
    if cxx is None:
        log.warning("no C++ compiler and no prebuilt kernels for this CPU: decode attention uses torch's SDPA "
                    "and projections oneDNN (slower)")
        return False
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    key = hashlib.sha256("\n".join([sources_key(), version, " ".join(FLAGS),
                                    _cpu_flags_line()]).encode()).hexdigest()[:16]
    target = cache_dir / "kernels" / f"promptserve-kernels-{key}.so"
    try:
        if not target.is_file():
            try:
                _build(cxx, target)
            except PermissionError:  # a read-only cache (an image's): build into a private temporary one
                target = Path(tempfile.mkdtemp(prefix="promptserve-kernels-")) / target.name
                _build(cxx, target)
            log.info("built the native kernels: %s", target)
        torch.ops.load_library(str(target))
    except Exception as exc:  # any build or load failure: SDPA and oneDNN, never a failed start
        log.warning("native kernels unavailable (%s): using torch's SDPA and oneDNN", str(exc)[:500])
        return False
    return True
