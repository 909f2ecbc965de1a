"""Build the native kernels for every x86 level of PREBUILT_LEVELS into a directory, with a manifest, so an
image or installation without a compiler loads the one its CPU allows (`kernels.load`):

    python -m app.engine.kernels.prebuild [DIR]     (default: prebuilt/ beside the sources)

Run where the image is built (the Dockerfile's build stage), with this torch installed: the libraries link
against it, and the manifest's key (sources and torch version) keeps another torch from loading them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from app.engine.kernels import PREBUILT_LEVELS, _build, compiler, prebuilt_dir, sources_key


def prebuild(directory: Path, compiler: str, only: set[str] | None = None) -> dict:
    """Build each level (or those in `only`) and write the manifest naming them."""
    directory.mkdir(parents=True, exist_ok=True)
    levels = {}
    for name, march, _ in PREBUILT_LEVELS:
        if only is not None and name not in only:
            continue
        target = directory / f"promptserve-kernels-{name}.so"
        _build(compiler, target, march)
        levels[name] = target.name
    manifest = {"key": sources_key(), "levels": levels}
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    directory = Path(args[0]) if args else prebuilt_dir()
    cxx = compiler()
    if cxx is None:
        print("prebuild: no C++ compiler (g++)", file=sys.stderr)
        return 2
    manifest = prebuild(directory, cxx)
    print(f"built {', '.join(manifest['levels'])} into {directory}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
