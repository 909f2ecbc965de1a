"""Speculative decoding (app/engine/speculation.py) on the benchmark's prompts, one client at a time, in process:

    python -m benchmarks.speculation [--prompts 48] [--rounds 2] [--tokens 3] [--until-eos] [--bare]

Each of the bench's real prompts (chat, ner and spam interleaved, each with its task's benchmark prompt set,
as `promptserve bench` sends them; --bare: none) runs alone, 64 greedy tokens with `ignore_eos` (--until-eos:
up to 64, ending at the end-of-turn token), through one engine with speculation off and on (`--tokens`
proposed tokens), alternated round by round so the machine's drift falls on both. Prints each round's decode
tokens per second of both, their ratio, how many outputs are identical (all must be: the check is exact),
and how many proposed tokens were kept. The engine loop runs on the main thread as `promptserve serve` runs
it.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from app.engine.engine import Engine, EngineConfig
from app.engine.types import EngineRequest, SamplingParams
from app.model.loader import load_model
from app.settings import Settings
from benchmarks.engine_wave import _prompt_set_refs, run_beside_engine
from benchmarks.roofline import cpu_name
from benchmarks.serving import _encode, load_prompts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=3, help="proposed tokens a step checks (speculation on)")
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--until-eos", action="store_true",
                        help="stop at the end-of-turn token (the bench's `ignore_eos` runs on past it, where a small "
                             "model often repeats itself: what speculation gains most on)")
    parser.add_argument("--bare", action="store_true", help="the bare model, no prompt sets (as llama-server runs)")
    args = parser.parse_args(argv)
    settings = Settings()
    loaded = load_model(settings)
    per_task = load_prompts(args.prompts)
    tasks = [("chat", "ner", "spam")[i % 3] for i in range(args.prompts)]
    prompts = [_encode(loaded.tokenizer, per_task[task][i // 3]) for i, task in enumerate(tasks)]
    refs = {} if args.bare else _prompt_set_refs(loaded.spec.fingerprint, None)
    sampling = SamplingParams(max_tokens=args.output_len, ignore_eos=not args.until_eos)
    # one engine, speculation switched between rounds (between requests: no step is in flight); the prompt
    # cache off, or each round would find the prompts whole from the round before
    engine = Engine(loaded, EngineConfig(max_num_seqs=2, max_model_len=1024, speculative_tokens=args.tokens,
                                         prompt_cache_bytes=0))
    results: dict[int, list] = {0: [], args.tokens: []}
    accepted = drafted = 0

    async def one(ids, ref):
        tokens, first, last = [], None, None
        async for out in engine.generate(EngineRequest(ids, sampling, ref)):
            now = time.perf_counter()
            first = first or now
            last = now
            tokens += out.token_ids
        return tokens, len(tokens) - 1, last - first  # decode: the tokens after the first, and their time

    def drive():
        nonlocal accepted, drafted
        for round_ in range(args.rounds + 1):  # round 0 warms up
            for k in results:
                engine.runner.speculative_tokens = k
                before = engine.stats()
                runs = [asyncio.run(one(ids, refs.get(task))) for ids, task in zip(prompts, tasks)]
                if round_:
                    results[k].append(runs)
                    after = engine.stats()
                    accepted += after.speculative_accepted_tokens - before.speculative_accepted_tokens
                    drafted += after.speculative_draft_tokens - before.speculative_draft_tokens

    run_beside_engine(engine, drive)
    off, on = 0, args.tokens
    print(f"CPU: {cpu_name()}; {loaded.spec.name} in {loaded.dtype}; {args.prompts} bench prompts "
          f"{'on the bare model' if args.bare else 'with their prompt sets'}, one at a time, "
          f"{'up to ' if args.until_eos else ''}{args.output_len} greedy tokens each, in process")
    for r in range(args.rounds):
        rate = {k: sum(n for _, n, _ in results[k][r]) / sum(t for _, _, t in results[k][r]) for k in results}
        print(f"round {r + 1}: decode {rate[off]:.1f} tok/s without speculation, {rate[on]:.1f} with "
              f"({on} proposed tokens): {rate[on] / rate[off]:.2f}x")
    same = sum(a[0] == b[0] for a, b in zip(results[off][-1], results[on][-1]))
    print(f"identical outputs: {same} of {args.prompts}")
    tokens = sum(len(run[0]) for k in results for round_ in results[k] for run in round_) // 2
    print(f"proposed tokens kept: {accepted} of {drafted} ({accepted / max(drafted, 1):.0%}); decode steps saved: "
          f"{accepted} of {tokens} tokens ({accepted / tokens:.0%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
