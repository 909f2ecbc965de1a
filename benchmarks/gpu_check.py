"""The prepared GPU check (`make gpu-check`): what a CUDA machine proves about the server in under 8 minutes.

    python -m benchmarks.gpu_check [--device cuda] [--shape llama-3-8b] [--clients 64] [--output-len 128]
                                   [--skip-tests] [--json gpu_check.json]

1. The model tests on the device (PROMPTSERVE_TEST_DEVICE): every family's parity with transformers in
   float32 and bfloat16, batch invariance, prompt sets (input, deep, PEFT imports, heads, training steps).
2. A random checkpoint of Llama-3-8B's shape, made on the device in bfloat16 (never shipped), served by the
   engine in process: batch-1 decode as a share of the device's measured memory bandwidth (every weight
   read once per token; goal >= 60%), `clients` concurrent requests against HF `generate` at that batch
   (goal >= 3x), TTFT/TPOT p50/p99, peak device memory.

`--device cpu --shape tiny` runs the same path in seconds (the suite does, so the script cannot rot), and
`--dry-run` only builds the shape on the meta device and prints its sizes. On the lent GPU machines
python3 has torch and transformers but not this project's other packages: carry them as wheels (see the
device tool's README) and run `PYTHONPATH=. python3 -m benchmarks.gpu_check`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.tiny_model import real_shape_model

MODEL_TESTS = ["tests/model/test_families.py", "tests/engine/test_parity.py", "tests/engine/test_batch_invariance.py",
               "tests/prompt_store/test_peft_import.py"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", default="llama-3-8b", help="a shape of benchmarks/tiny_model.py SHAPES")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--single-requests", type=int, default=3, help="batch-1 requests timed")
    parser.add_argument("--skip-tests", action="store_true", help="only the model measurements")
    parser.add_argument("--dry-run", action="store_true", help="build the shape on the meta device, print sizes")
    parser.add_argument("--json", help="write the report here")
    return parser.parse_args(argv)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes one decode step reads: every distinct parameter once (a tied head counted once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def device_bandwidth_gb_s(device: torch.device) -> float:
    """Bytes read and written per second by a large device-to-device copy (the achievable bandwidth)."""
    x = torch.empty(512 * 1024 * 1024, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    _sync(device)
    start = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    _sync(device)
    return 10 * 2 * x.numel() / (time.perf_counter() - start) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_tests(device: str) -> dict:
    """The model tests on the device, as a subprocess: their summary line and exit code."""
    env = {**os.environ, "PROMPTSERVE_TEST_DEVICE": device}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "not real_model", "-p", "no:cacheprovider",
                           *MODEL_TESTS], env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    return {"returncode": done.returncode, "summary": lines[-1] if lines else done.stdout[-500:],
            "failures": [line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]}


def _percentiles(xs: list[float]) -> dict:
    ordered = sorted(xs)

    def at(p):
        return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))] if ordered else float("nan")
    return {"p50": at(50), "p99": at(99)}


async def _timed(engine, ids: list[int], output_len: int) -> dict:
    from app.engine.types import EngineRequest, SamplingParams

    start = time.perf_counter()
    stamps = []
    async for out in engine.generate(EngineRequest(ids, SamplingParams(max_tokens=output_len, ignore_eos=True,
                                                                            temperature=0.0))):
        stamps.extend([time.perf_counter()] * len(out.token_ids))
    return {"ttft": stamps[0] - start, "e2e": stamps[-1] - start, "tokens": len(stamps),
            "tpot": (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)}


def serve_measurements(loaded, args) -> dict:
    """Batch-1 decode and `clients` concurrent requests through the engine in process; then HF generate."""
    from app.engine.engine import Engine, EngineConfig
    from benchmarks.serving import hf_batched

    tok = loaded.tokenizer
    prompts = [[{"role": "user", "content": " ".join(f"w{(k * 7919 + i * 104729) % 9973}"
                                                     for i in range(args.prompt_len // 2))}]
               for k in range(args.clients)]
    ids = [tok.encode(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False),
                      add_special_tokens=False) for m in prompts]
    context = max(map(len, ids)) + args.output_len + 8
    engine = Engine(loaded, EngineConfig(max_num_seqs=args.clients, max_model_len=context,
                                         max_prefill_tokens=max(1024, context)))
    engine.start()
    try:
        asyncio.run(_timed(engine, ids[0], 4))  # warm-up: allocator, kernels
        single = [asyncio.run(_timed(engine, ids[k], args.output_len)) for k in range(args.single_requests)]

        async def together():
            return await asyncio.gather(*(_timed(engine, i, args.output_len) for i in ids))
        start = time.perf_counter()
        many = asyncio.run(together())
        wall = time.perf_counter() - start
    finally:
        engine.stop()
    report = {
        "batch1_decode_tok_s": 1 / statistics.median(r["tpot"] for r in single),
        "clients": args.clients,
        "clients_output_tok_s": sum(r["tokens"] for r in many) / wall,
        "ttft_s": _percentiles([r["ttft"] for r in many]),
        "tpot_ms": {k: 1000 * v for k, v in _percentiles([r["tpot"] for r in many]).items()},
    }
    with torch.inference_mode():
        report["hf_batch"] = hf_batched(loaded.model, tok, prompts, args.output_len, args.clients)
        report["hf_batch1"] = hf_batched(loaded.model, tok, prompts[:args.single_requests], args.output_len, 1)
    return report


def report_text(r: dict) -> str:
    """The check's findings as lines for a terminal and the README."""
    lines = [f"device: {r['device_name']}; model: random {r['shape']} ({r['weights_gb']:.2f} GB in {r['dtype']})"]
    if "tests" in r:
        lines.append(f"model tests on {r['device']}: {r['tests']['summary']} (exit {r['tests']['returncode']})")
        lines += [f"  {line}" for line in r["tests"]["failures"]]
    if "serve" in r:
        s = r["serve"]
        share = s["batch1_decode_tok_s"] * r["weights_gb"] / r["bandwidth_gb_s"]
        lines += [
            f"batch-1 decode: {s['batch1_decode_tok_s']:.1f} tok/s = {100 * share:.0f}% of the measured "
            f"{r['bandwidth_gb_s']:.0f} GB/s (goal >= 60%); HF generate batch 1: "
            f"{s['hf_batch1']['output_tok_s']:.1f} tok/s",
            f"{s['clients']} clients: {s['clients_output_tok_s']:.0f} tok/s = "
            f"{s['clients_output_tok_s'] / s['hf_batch']['output_tok_s']:.2f}x HF generate batch {s['clients']} "
            f"({s['hf_batch']['output_tok_s']:.0f} tok/s; goal >= 3x)",
            f"TTFT p50/p99 {s['ttft_s']['p50']:.3f}/{s['ttft_s']['p99']:.3f} s; TPOT p50/p99 "
            f"{s['tpot_ms']['p50']:.1f}/{s['tpot_ms']['p99']:.1f} ms",
        ]
    if r.get("peak_memory_gb") is not None:
        lines.append(f"peak device memory: {r['peak_memory_gb']:.2f} GB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dtype = torch.bfloat16
    if args.dry_run:
        model = real_shape_model(args.shape, 128256, dtype, "meta")
        print(f"{args.shape}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, "
              f"{weight_bytes(model) / 1e9:.2f} GB in bfloat16 (built on meta, nothing allocated)")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); --device cpu --shape tiny "
              "runs the same path on this CPU", file=sys.stderr)
        return 2
    report: dict = {"device": str(device), "shape": args.shape, "dtype": str(dtype).removeprefix("torch."),
                    "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    started = time.perf_counter()
    if not args.skip_tests:
        report["tests"] = run_tests(args.device)
    from transformers import AutoTokenizer

    from app.model.loader import LoadedModel, stop_token_ids
    from app.model.source import resolve_checkpoint
    from app.model.spec import model_spec
    from app.settings import Settings

    tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint("", Settings().cache_dir)[0])
    model = real_shape_model(args.shape, len(tokenizer), dtype, args.device)
    report["weights_gb"] = weight_bytes(model) / 1e9
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loaded = LoadedModel(model=model, tokenizer=tokenizer, spec=model_spec(model, f"random-{args.shape}"),
                         device=device, dtype=dtype, stop_token_ids=stop_token_ids(model, tokenizer),
                         max_position_embeddings=model.config.max_position_embeddings)
    report["bandwidth_gb_s"] = device_bandwidth_gb_s(device)
    report["serve"] = serve_measurements(loaded, args)
    report["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    report["wall_s"] = time.perf_counter() - started
    print(report_text(report))
    print(f"(the check took {report['wall_s']:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    failed = report.get("tests", {}).get("returncode", 0) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
