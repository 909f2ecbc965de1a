"""Where a decode step's time goes, in process, at batch 1 and 64 (the embedded SmolLM2, its dtype here):

    python -m benchmarks.step_profile [--batches 1,64] [--steps 10]

Each part of the step is wrapped in a timer (the projections of the 30 layers, attention, the cache
writes, norms, rotary, lm_head, sampling: CPU ops are synchronous, so wall time around a call is its cost;
a profiler's per-op overhead would inflate the parts made of many small ops) and the step's wall time is
split by them; what no timer covers (Python, residual adds, reshapes, mask building) is "other". Also
prints the share of the step that is not the model's matmuls (the issue's goal: below 35% at batch 64) and
the roofline for this machine: its measured read bandwidth and matmul rate give the ceiling on tokens
per second at batch 1 (every weight read once per token) and at batch 64 (the matmuls' FLOPs), and each
measured step as a fraction of it.
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager

import app.engine.model_runner as model_runner
import app.model.forward as llama
from app.engine.engine import Engine, EngineConfig
from app.model.linear import SMALL_BATCH_ROWS
from app.model.loader import load_model
from app.settings import Settings
from benchmarks.engine_steps import running_sequences
from benchmarks.roofline import cpu_name, describe, measure_machine, roofline

# "decode layers (one native op)": every layer of a 1-2 row bf16 step at once (kernels/decode_layers.cpp),
# which the parts inside it cannot be told apart in; `layer_by_layer_ms` is the same step without it
PARTS = ["projections", "lm_head", "attention", "cache writes", "norms+adds", "rotary", "rotary+cache writes",
         "decode layers (one native op)", "sampling"]


SPENT: dict[str, float] = {}


ACTIVE: set[str] = set()


def _labelled(label: str, fn):
    def wrapped(*args, **kwargs):
        if label in ACTIVE:  # nested in a call of the same part (add_norm's fallback calls rms_norm)
            return fn(*args, **kwargs)
        ACTIVE.add(label)
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            ACTIVE.discard(label)
            SPENT[label] = SPENT.get(label, 0.0) + time.perf_counter() - started
    return wrapped


@contextmanager
def instrumented(runner):
    """Wrap the step's parts in profiler labels (restored after)."""
    forward = runner.forward
    saved = []

    def patch(obj, name, label):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, _labelled(label, getattr(obj, name)))

    for lin in forward.linears:
        patch(lin, "qkv_joined", "projections")
        patch(lin, "o", "projections")
        patch(lin, "mlp", "projections")  # gate/up and down, and the activation between them
    patch(llama, "rms_norm", "norms+adds")
    patch(forward, "add_norm", "norms+adds")  # a residual add and the next norm, fused where native
    patch(forward, "lm_head", "lm_head")
    patch(forward, "grouped_attention", "attention")
    if runner.decode_attention is not None:  # the native kernel, when it built here
        patch(runner, "decode_attention", "attention")
    patch(llama, "apply_rotary", "rotary")
    if runner._rotary_cache_write is not None:  # the native rotary, which writes the cache too
        patch(runner, "_rotary_cache_write", "rotary+cache writes")
    if forward._decode_layers is not None:
        patch(forward, "_decode_layers", "decode layers (one native op)")
    patch(model_runner, "sample", "sampling")
    patch(runner, "_write_kv", "cache writes")
    try:
        yield
    finally:
        for obj, name, original in reversed(saved):
            if name == "_write_kv":
                delattr(obj, name)  # the instance attribute shadowed the method
            else:
                setattr(obj, name, original)


def step_breakdown(runner, batch: int, steps: int) -> dict:
    seqs = running_sequences(runner, batch)

    def step():
        out, _ = runner.decode(seqs)
        for s in seqs:
            s.output_ids.extend(out[s.request_id])
    def median_ms() -> float:  # the step's own time, no timers
        for _ in range(3):
            step()
        plain = []
        for _ in range(steps):
            t = time.perf_counter()
            step()
            plain.append(time.perf_counter() - t)
        return 1000 * sorted(plain)[len(plain) // 2]
    wall_ms = median_ms()
    layer_by_layer_ms = None
    native = runner.forward._decode_layers
    if native is not None and batch <= SMALL_BATCH_ROWS:  # the same steps without the one native op
        runner.forward._decode_layers = None
        try:
            layer_by_layer_ms = median_ms()
        finally:
            runner.forward._decode_layers = native
    SPENT.clear()
    timed = []
    with instrumented(runner):
        for _ in range(steps):
            t = time.perf_counter()
            step()
            timed.append(time.perf_counter() - t)
    for s in seqs:
        runner.release(s.request_id)
    # the parts' shares of the timed steps, applied to the untimed median step
    scale = wall_ms / (1000 * sum(timed) / steps)
    parts = {k: 1000 * SPENT.get(k, 0.0) / steps * scale for k in PARTS}
    parts["other"] = max(wall_ms - sum(parts.values()), 0.0)
    return {"batch": batch, "step_ms": wall_ms, "parts_ms": parts, "layer_by_layer_ms": layer_by_layer_ms}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--model", default="", help="a checkpoint directory (default: the embedded model)")
    args = parser.parse_args(argv)
    loaded = load_model(Settings(model=args.model))
    batches = [int(b) for b in args.batches.split(",")]
    # as the server builds it: the engine owns the model, so its packed copies replace the weights
    runner = Engine(loaded, EngineConfig(max_num_seqs=max(batches), max_model_len=512, speculative_tokens=0,
                                         release_model_weights=True)).runner
    machine = measure_machine(loaded.dtype)
    print(f"CPU: {cpu_name()}; model {loaded.spec.name} in {loaded.dtype}; {describe(machine)}")
    for batch in batches:
        r = step_breakdown(runner, batch, args.steps)
        parts = r["parts_ms"]
        fused = parts["decode layers (one native op)"] > 0  # its projections are inside it, not told apart
        matmuls = (parts["projections"] + parts["lm_head"]) / r["step_ms"]
        non_matmul = "" if fused else f"not matmuls {100 * (1 - matmuls):.0f}%; "
        ceiling = roofline(loaded, machine, batch)
        achieved = batch / (r["step_ms"] / 1000)
        print(f"batch {batch}: step {r['step_ms']:.1f} ms = " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
              + f" ms; {non_matmul}{achieved:.0f} tok/s of a roofline {ceiling:.0f} "
              f"({100 * achieved / ceiling:.0f}%)")
        if r["layer_by_layer_ms"] is not None:
            layered = r["layer_by_layer_ms"]
            print(f"batch {batch}: without the native decode op (layer by layer, same run): step {layered:.1f} ms; "
                  f"the op makes the step {layered / r['step_ms']:.2f}x faster")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
