"""The benchmark's 64-client wave in process, without HTTP: how much of the served figure is the engine.

    python -m benchmarks.engine_wave [--waves 3] [--requests 64] [--prompt-sets [--ner-set FILE]]

The same real prompts as `promptserve bench` (chat, ner and spam interleaved), all submitted at once, 64
greedy tokens each with `ignore_eos`; the engine loop runs on the main thread as `promptserve serve` runs
it (a second thread running torch kernels slows the steps), the requests from an asyncio loop on another.
Prints each wave's output tokens per second and where the last wave's time went (prefill and decode
forward passes, from the model runner). Without --prompt-sets the requests run bare: with 16-token
`input` and `deep` sets on the rows the waves measured the same (583-596 against 581-594 tok/s, AMD EPYC).
--prompt-sets puts each task's benchmark set on its rows; --ner-set swaps the ner one (to compare two).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import shutil
import tempfile
import threading
import time
from pathlib import Path

from app.engine.engine import Engine, EngineConfig
from app.engine.types import EngineRequest, PromptSetRef, SamplingParams
from app.model.loader import load_model
from app.settings import Settings
from benchmarks.roofline import cpu_name
from benchmarks.serving import BENCH_SETS, _encode, bench_prompt_sets, load_prompts
from prompt_store import format as psf
from prompt_store.store import sha256_of


def _timed(log: list, kind: str, fn):
    def wrapped(seqs):
        started = time.perf_counter()
        try:
            return fn(seqs)
        finally:
            log.append((kind, len(seqs), time.perf_counter() - started))
    return wrapped


def _prompt_set_refs(fingerprint: str, ner_set: str | None) -> dict[str, PromptSetRef]:
    """task -> a reference to its benchmark prompt set, written to a temporary folder (the engine reads a
    set's bytes from its path and checks them against the hash)."""
    sets = dict(BENCH_SETS, **({"ner": Path(ner_set)} if ner_set else {}))
    folder = Path(tempfile.mkdtemp(prefix="promptserve-wave-"))
    atexit.register(shutil.rmtree, folder, True)
    refs = {}
    for name, data in bench_prompt_sets(fingerprint, sets).items():
        path = folder / f"{name}.safetensors"
        path.write_bytes(data)
        task = name.removeprefix("bench-")
        refs[task] = PromptSetRef(name, 1, str(path), psf.parse(data).meta.num_virtual_tokens, sha256_of(data))
    return refs


def run_beside_engine(engine: Engine, work) -> None:
    """work() on a thread of its own while the engine loop runs on this (the main) thread, as `promptserve
    serve` runs it (a second thread running torch kernels slows the steps); the engine stops when work ends."""
    def drive():
        try:
            work()
        finally:
            engine.stop()

    driver = threading.Thread(target=drive)
    driver.start()
    engine.run_forever()
    driver.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--waves", type=int, default=3)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--prompt-sets", action="store_true",
                        help="each request with its task's benchmark prompt set (BENCH_SETS), as `promptserve bench`")
    parser.add_argument("--ner-set", help="with --prompt-sets: this file as the ner set instead")
    parser.add_argument("--prompt-cache-mb", type=int, default=Settings().prompt_cache_mb,
                        help="the prompt cache's size (0: off; default: the server's)")
    args = parser.parse_args(argv)
    settings = Settings()
    loaded = load_model(settings)
    # each wave (the warm-up too) draws its own prompts, as the server's clients send new ones: the same
    # prompts again would be found whole in the prompt cache
    per_task = load_prompts(args.requests * (args.waves + 1))
    tasks = [task for _ in range(args.requests) for task in ("chat", "ner", "spam")][:args.requests]
    waves = [[_encode(loaded.tokenizer, per_task[task][w * args.requests + i // 3]) for i, task in enumerate(tasks)]
             for w in range(args.waves + 1)]
    refs = _prompt_set_refs(loaded.spec.fingerprint, args.ner_set) if args.prompt_sets else {}
    engine = Engine(loaded, EngineConfig(max_num_seqs=args.requests, max_model_len=1024,
                                         prompt_cache_bytes=args.prompt_cache_mb << 20,
                                         kernel_cache_dir=str(settings.cache_dir) if settings.native_kernels
                                         else None))
    log: list = []
    runner = engine.runner
    runner.prefill, runner.decode = _timed(log, "prefill", runner.prefill), _timed(log, "decode", runner.decode)
    sampling = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0)

    async def one(ids, ref):
        async for _ in engine.generate(EngineRequest(ids, sampling, ref)):
            pass

    async def wave(prompts):
        await asyncio.gather(*(one(ids, refs.get(task)) for ids, task in zip(prompts, tasks)))

    walls: list[float] = []

    def drive():
        asyncio.run(wave(waves[0]))  # warm-up
        for prompts in waves[1:]:
            log.clear()
            started = time.perf_counter()
            asyncio.run(wave(prompts))
            walls.append(time.perf_counter() - started)

    run_beside_engine(engine, drive)
    tokens = args.requests * args.output_len
    print(f"CPU: {cpu_name()}; {loaded.spec.name} in {loaded.dtype}; {args.requests} requests x "
          f"{args.output_len} tokens at once, in process")
    print("waves: " + ", ".join(f"{w:.2f} s ({tokens / w:.1f} tok/s)" for w in walls))
    prefill = [entry for entry in log if entry[0] == "prefill"]
    decode = [entry for entry in log if entry[0] == "decode"]
    print(f"last wave: {len(prefill)} prefill passes {sum(e[2] for e in prefill):.2f} s "
          f"(prompts per pass: {[e[1] for e in prefill]}), {len(decode)} decode steps "
          f"{sum(e[2] for e in decode):.2f} s")
    cache = engine.runner.prompts
    print(f"prompt cache ({args.prompt_cache_mb} MiB): {cache.hit_tokens} of {cache.prompt_tokens} prompt tokens "
          f"copied from it instead of prefilled, {len(cache)} blocks held")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
