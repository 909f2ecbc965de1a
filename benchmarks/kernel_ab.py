"""Times this checkout's native kernels against another git revision's on this CPU.

Both libraries are built from their own sources (the engine's flags, -march=native) and loaded side by side
under op namespaces of their own; trials alternate between them, and their outputs must be identical. On a
machine whose speed drifts by 15-30% within minutes (a shared VM), only trials interleaved in one process say
whether a kernel change pays: this is how the README's kernel figures were measured.

    python -m benchmarks.kernel_ab --base 87ecd0d --op attention --batches 1,64 --positions 160
    python -m benchmarks.kernel_ab --base HEAD~1 --op linear --batches 1,4,64

attention: decode attention over 30 layers of a SmolLM2-shaped KV cache (3 KV heads of 64, groups of 3), read
from memory as a decode step reads it. linear: the bf16 projections of 30 SmolLM2 layers (q/k/v, o, gate/up,
down) at each batch (the small-batch kernel up to 4 rows where bf16_linear is not built here).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from app.engine import kernels

KERNELS_DIR = Path(kernels.__file__).parent
REPO = KERNELS_DIR.parents[2]
LAYERS, KV_HEADS, GROUP, HEAD_DIM = 30, 3, 3, 64
PROJECTIONS = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # SmolLM2: q/k/v, o, gate/up, down


def sources_at(revision: str | None) -> dict[str, str]:
    """The kernels' .cpp and .h files at a git revision (None: this checkout's, what the engine builds), by name."""
    if revision is None:
        return {p.name: p.read_text() for p in kernels.SOURCES + kernels.HEADERS}
    rel = KERNELS_DIR.relative_to(REPO).as_posix()
    names = subprocess.run(["git", "-C", str(REPO), "ls-tree", "--name-only", f"{revision}:{rel}"],
                           capture_output=True, text=True, check=True).stdout.split()
    return {name: subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:{rel}/{name}"], capture_output=True,
                                 text=True, check=True).stdout
            for name in names if name.endswith((".cpp", ".h"))}


def renamed(source: str, namespace: str) -> str:
    """A source whose ops register under `namespace` instead of promptserve (the C++ code is unchanged)."""
    return re.sub(r"\bTORCH_LIBRARY(_FRAGMENT|_IMPL)?\(promptserve\b", rf"TORCH_LIBRARY\1({namespace}", source)


def build(sources: dict[str, str], namespace: str, directory: Path):
    """Build and load these sources as torch.ops.<namespace>; returns that namespace."""
    cxx = kernels.compiler()
    if cxx is None:
        raise SystemExit("no C++ compiler here")
    folder = directory / namespace
    folder.mkdir(parents=True)
    for name, text in sources.items():
        (folder / name).write_text(renamed(text, namespace) if name.endswith(".cpp") else text)
    target = folder / f"{namespace}.so"
    kernels._build(cxx, target, sources=sorted(folder.glob("*.cpp")))
    torch.ops.load_library(str(target))
    return getattr(torch.ops, namespace)


def attention_case(ops, batch: int, positions: int):
    """A call over 30 layers of a cache far larger than the CPU's caches, as a decode step makes it."""
    g = torch.Generator().manual_seed(batch * 7919 + positions)
    width = positions + 16
    k = (torch.randn(LAYERS, batch, KV_HEADS, width, HEAD_DIM, generator=g) * 0.5).bfloat16()
    v = torch.randn(LAYERS, batch, KV_HEADS, width, HEAD_DIM, generator=g).bfloat16()
    q = torch.randn(LAYERS, batch, KV_HEADS, GROUP, HEAD_DIM, generator=g).bfloat16()
    lengths = positions - 1 - torch.arange(batch) % 7  # ragged rows, each up to its own length
    return lambda op: [op.decode_attention(q[i], k[i], v[i], lengths, HEAD_DIM ** -0.5) for i in range(LAYERS)]


def linear_case(ops, batch: int, positions: int):
    g = torch.Generator().manual_seed(batch)
    weights = [[(torch.randn(n, k, generator=g) * 0.05).bfloat16() for n, k in PROJECTIONS] for _ in range(LAYERS)]
    xs = {k: torch.randn(batch, k, generator=g).bfloat16() for _, k in PROJECTIONS}
    wide = ops.bf16_linear_supported()
    if not wide and batch > 4:
        raise SystemExit("bf16_linear is not built on this CPU (it has AVX-512 BF16): batches of 1-4 rows only")
    return lambda op: [(op.bf16_linear if wide else op.small_batch_linear)(xs[w.shape[1]], w)
                       for layer in weights for w in layer]


CASES = {"attention": attention_case, "linear": linear_case}


def compare(ops: dict, case, trials: int) -> dict[str, list[float]]:
    """Seconds per call of each library, trials interleaved; raises if their outputs differ."""
    outputs = {name: case(op) for name, op in ops.items()}
    first = next(iter(outputs.values()))
    for name, out in outputs.items():
        if not all(torch.equal(a, b) for a, b in zip(out, first)):
            raise AssertionError(f"{name}'s output differs from {next(iter(outputs))}'s")
    times: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(trials):
        for name, op in ops.items():
            started = time.perf_counter()
            case(op)
            times[name].append(time.perf_counter() - started)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="the git revision to compare against (e.g. HEAD~1)")
    parser.add_argument("--op", choices=sorted(CASES), default="attention")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--positions", type=int, default=160, help="attention: cached positions a row reads")
    parser.add_argument("--trials", type=int, default=21)
    args = parser.parse_args(argv)
    from benchmarks.roofline import cpu_name

    with tempfile.TemporaryDirectory(prefix="kernel-ab-") as tmp:
        ops = {"base": build(sources_at(args.base), "promptserve_ab_base", Path(tmp)),
               "this": build(sources_at(None), "promptserve_ab_this", Path(tmp))}
        print(f"CPU: {cpu_name()}; {args.op}, base {args.base} against this checkout, best and median of "
              f"{args.trials} interleaved trials")
        for batch in (int(b) for b in args.batches.split(",")):
            times = compare(ops, CASES[args.op](ops["this"], batch, args.positions), args.trials)
            best = {name: min(t) for name, t in times.items()}
            median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
            where = f" at {args.positions} positions" if args.op == "attention" else ""
            print(f"batch {batch}{where}: base {1000 * best['base']:.2f} ms (median {1000 * median['base']:.2f}), "
                  f"this {1000 * best['this']:.2f} ms (median {1000 * median['this']:.2f}): "
                  f"{best['base'] / best['this']:.2f}x; outputs identical")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
