"""Greedy outputs with the native kernels (app/engine/kernels) against torch's own ops, on the benchmark's
prompts (the embedded model in its serving dtype, 64 tokens each):

    python -m benchmarks.kernel_parity [--prompts 48] [--alone]

Together (the default) the prompts decode as one batch: only decode attention differs (native kernel vs
SDPA). --alone decodes each prompt by itself, where the bfloat16 projections of a one-row step also run
natively (small_batch_linear vs oneDNN). On a CPU without native bf16 matmuls (AVX-512 without BF16, AVX2)
torch's ops run in float32 (roofline.baseline_dtype) and every projection is native. Prints how many
outputs are identical and, for each that is not, the first token where they part and the two candidates'
logits gap there (a near-tie that float rounding can flip). Both run in the same engine code.
"""

from __future__ import annotations

import argparse
import asyncio

import torch

from app.engine.engine import Engine, EngineConfig
from app.engine.types import EngineRequest, SamplingParams
from app.model.loader import load_model
from app.settings import Settings
from benchmarks.roofline import baseline_dtype, cpu_name, load_baseline
from benchmarks.serving import load_prompts


def generate(loaded, prompts: list[list[int]], kernel_cache_dir: str | None, max_tokens: int,
             alone: bool = False) -> list[list[int]]:
    engine = Engine(loaded, EngineConfig(max_num_seqs=len(prompts), max_model_len=512,
                                         kernel_cache_dir=kernel_cache_dir))
    assert (engine.runner.decode_attention is not None) == (kernel_cache_dir is not None), "kernel did not build"
    engine.start()

    async def one(ids):
        tokens = []
        async for out in engine.generate(EngineRequest(ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True))):
            tokens += out.token_ids
        return tokens

    async def everything():
        if alone:
            return [await one(ids) for ids in prompts]
        return await asyncio.gather(*(one(ids) for ids in prompts))
    try:
        return asyncio.run(everything())
    finally:
        engine.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--alone", action="store_true", help="decode each prompt by itself (batch 1)")
    args = parser.parse_args(argv)
    settings = Settings()
    loaded = load_model(settings)
    tok = loaded.tokenizer
    per_task = load_prompts(args.prompts // 3 + 1)
    messages = [m for task in per_task.values() for m in task][:args.prompts]
    prompts = [tok.encode(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False),
                          add_special_tokens=False) for m in messages]
    # torch's ops in the served dtype; where this CPU has no native bf16 matmul (AVX2: reference code at ~1
    # GFLOP/s, an hour for this run) in float32, which the native bf16 output is then compared with directly
    reference = loaded if baseline_dtype(loaded.dtype, loaded.device) == loaded.dtype else load_baseline(settings)[0]
    sdpa = generate(reference, prompts, None, args.max_tokens, args.alone)
    native = generate(loaded, prompts, str(settings.cache_dir), args.max_tokens, args.alone)
    same = sum(a == b for a, b in zip(sdpa, native))
    print(f"CPU: {cpu_name()}; {loaded.spec.name} in {loaded.dtype}; greedy, {args.max_tokens} tokens, "
          f"{len(prompts)} benchmark prompts decoded {'one at a time' if args.alone else 'together'}: "
          f"identical {same} of {len(prompts)} (torch's ops in {reference.dtype} vs the native kernels)")
    if reference.dtype != torch.float32:  # which of the two stays closer to float32 attention and weights?
        exact = generate(load_model(Settings(dtype="float32")), prompts, None, args.max_tokens, args.alone)

        def agree(xs):
            return sum(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
                       for a, b in zip(xs, exact)) / len(xs)
        print(f"mean tokens before parting from the float32 model's greedy output: torch {agree(sdpa):.1f}, "
              f"native {agree(native):.1f} (of {args.max_tokens})")
    model = reference.model
    for k, (a, b) in enumerate(zip(sdpa, native)):
        if a == b:
            continue
        at = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        with torch.inference_mode():  # the reference model's logits at the parting token: how close a tie
            ids = torch.tensor([prompts[k] + a[:at]])
            logits = model(ids).logits[0, -1].float()
        gap = (logits[a[at]] - logits[b[at]]).item()
        print(f"  prompt {k}: parts at token {at} of {len(a)}: torch {tok.decode([a[at]])!r} vs native "
              f"{tok.decode([b[at]])!r}; transformers' logits differ by {gap:+.3f} there")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
