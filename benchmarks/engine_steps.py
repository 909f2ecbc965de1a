"""In-process timings of the engine's steps behind the README's engine figures:

  python -m benchmarks.engine_steps

1. a torch op on a second, still-living thread (as an upload validated on an HTTP worker used to do)
   against decode steps at batch 1;
2. decode steps at batch 1/16/63 and a 31-token prefill, with packed linear weights and with the model's
   own modules;
3. the 30 layers' projections, packed separately against q/k/v and gate/up fused; greedy generations with
   and without packed weights compared token for token; an operator profile of a batch-1 decode step;
4. eight streams beside one long prompt: the longest gap between their tokens, prefilled whole and in
   256-token chunks, and the long prompt's answer both ways.
Everything runs in the model's dtype on this machine; medians of repeated steps.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time

import torch

from app.engine.engine import Engine, EngineConfig
from app.engine.types import EngineRequest, GenerationRequest, SamplingParams, Sequence
from app.model.linear import PackedLinear
from app.model.loader import load_model
from app.settings import Settings
from training.data import read_jsonl
from training.presets import DATASETS


def _median_ms(fn, n: int = 20, skip: int = 4) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times[skip:])


def running_sequences(runner, batch: int, prompt_len: int = 150) -> list[Sequence]:
    """`batch` sequences prefilled (8 at a time) and holding their first token, ready to decode."""
    seqs = [Sequence(GenerationRequest(f"r{i}", list(range(1000, 1000 + prompt_len)),
                                       SamplingParams(max_tokens=1 << 30, ignore_eos=True)),
                     num_scheduled_tokens=prompt_len) for i in range(batch)]  # whole prompts, as the scheduler
    for k in range(0, batch, 8):
        sampled, _, _ = runner.prefill(seqs[k:k + 8])
        for s in seqs[k:k + 8]:
            s.output_ids.extend(sampled[s.request_id])
    return seqs


def _decode_ms(runner, seqs) -> float:
    """Median decode step of these running sequences, which are released afterwards."""
    def step():
        out, _ = runner.decode(seqs)
        for s in seqs:
            s.output_ids.extend(out[s.request_id])
    ms = _median_ms(step)
    for s in seqs:
        runner.release(s.request_id)
    return ms


def _prefill_ms(runner, ids: list[int]) -> float:
    count = iter(range(1 << 30))

    def one():
        seq = Sequence(GenerationRequest(f"p{next(count)}", ids, SamplingParams(max_tokens=1)),
                       num_scheduled_tokens=len(ids))
        runner.prefill([seq])
        runner.release(seq.request_id)
    return _median_ms(one, n=8, skip=2)


def second_openmp_team(loaded) -> None:
    runner = Engine(loaded, EngineConfig(max_num_seqs=2, max_model_len=512, speculative_tokens=0)).runner
    alone = _decode_ms(runner, running_sequences(runner, 1))
    release = threading.Event()

    def validate_then_idle():  # what an upload validated on an HTTP worker thread did
        torch.isfinite(torch.randn(30, 3, 16, 64)).all()
        release.wait()
    worker = threading.Thread(target=validate_then_idle)
    worker.start()
    beside = _decode_ms(runner, running_sequences(runner, 1))
    release.set()
    worker.join()
    print(f"decode at batch 1: {alone:.1f} ms alone, {beside:.1f} ms with another live thread that ran a torch op "
          f"({beside / alone:.2f}x)")


def packed_weights(loaded, tokenizer) -> None:
    short = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                          tokenize=False)
    short_ids = tokenizer.encode(short, add_special_tokens=False)
    figures = {}
    for pack in (False, True):
        runner = Engine(loaded, EngineConfig(max_num_seqs=64, max_model_len=512, pack_weights=pack,
                                             speculative_tokens=0)).runner
        row = {f"decode batch {b}": _decode_ms(runner, running_sequences(runner, b)) for b in (1, 16, 63)}
        row[f"prefill {len(short_ids)} tokens"] = _prefill_ms(runner, short_ids)
        figures[pack] = row
        del runner
    for key in figures[True]:
        print(f"{key}: {figures[False][key]:.1f} ms with the model's modules, {figures[True][key]:.1f} ms packed")


def decode_profile(loaded) -> None:
    """Where a batch-1 decode step's time goes (packed weights), by operator."""
    from torch.profiler import profile

    runner = Engine(loaded, EngineConfig(max_num_seqs=2, max_model_len=512, speculative_tokens=0)).runner
    seqs = running_sequences(runner, 1)
    for _ in range(3):
        seqs[0].output_ids.append(runner.decode(seqs)[0][seqs[0].request_id])
    with profile() as prof:
        for _ in range(5):
            seqs[0].output_ids.append(runner.decode(seqs)[0][seqs[0].request_id])
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    share = {"linear (packed matmuls)": "mkldnn::_linear_pointwise", "attention": "scaled_dot_product"}
    parts = {name: sum(e.self_cpu_time_total for e in events if key in e.key) / total for name, key in share.items()}
    print("batch-1 decode step profile: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in parts.items())
          + f", everything else {100 * (1 - sum(parts.values())):.0f}%")


def packed_generations(loaded, tokenizer) -> None:
    prompts = ["What is your name?", "Write a haiku about rain.", "List three colours.", "Why is the sky blue?"]
    texts = {}
    for pack in (False, True):
        engine = Engine(loaded, EngineConfig(max_num_seqs=8, max_model_len=512, pack_weights=pack))
        engine.start()

        async def run(prompt, engine=engine):
            chat = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 tokenize=False)
            request = EngineRequest(tokenizer.encode(chat, add_special_tokens=False), SamplingParams(max_tokens=40))
            parts = [out.text async for out in engine.generate(request)]
            return "".join(parts)

        async def all_prompts():
            return await asyncio.gather(*(run(p) for p in prompts))
        texts[pack] = asyncio.run(all_prompts())
        engine.stop()
    same = sum(a == b for a, b in zip(texts[False], texts[True]))
    print(f"greedy generations (40 tokens) identical with packed weights: {same} of {len(prompts)}")


def fused_projections(loaded) -> None:
    layers = list(loaded.model.model.layers)
    separate = [[PackedLinear(m) for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                                           layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj,
                                           layer.mlp.down_proj)]
                for layer in layers]
    fused = [[PackedLinear.concat([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
              PackedLinear(layer.self_attn.o_proj), PackedLinear.concat([layer.mlp.gate_proj, layer.mlp.up_proj]),
              PackedLinear(layer.mlp.down_proj)] for layer in layers]
    hidden, inner = loaded.model.config.hidden_size, loaded.model.config.intermediate_size
    for batch in (1, 16, 64):
        x = torch.randn(batch, hidden).to(loaded.dtype)
        xi = torch.randn(batch, inner).to(loaded.dtype)

        def run(linears):
            with torch.inference_mode():
                for layer in linears:
                    for lin in layer[:-1]:
                        lin(x)
                    layer[-1](xi)
        print(f"projections of all layers, batch {batch}: {_median_ms(lambda: run(separate)):.1f} ms separate, "
              f"{_median_ms(lambda: run(fused)):.1f} ms with q/k/v and gate/up fused")


def chunked_prefill(loaded, tokenizer) -> None:
    text = " ".join(r["instruction"] + " " + r["output"] for r in read_jsonl(DATASETS / "chat/dev.jsonl", 40))
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Summarize: " + text}],
                                         add_generation_prompt=True, tokenize=False)
    long_ids = tokenizer.encode(chat, add_special_tokens=False)[:1600]
    story = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a story."}],
                                                           add_generation_prompt=True, tokenize=False),
                             add_special_tokens=False)
    answers = []
    for budget in (4096, 256):
        engine = Engine(loaded, EngineConfig(max_num_seqs=16, max_model_len=2048, max_prefill_tokens=budget))
        engine.start()
        gaps: list[float] = []

        async def stream():
            last = None
            async for _ in engine.generate(EngineRequest(story, SamplingParams(max_tokens=60, ignore_eos=True))):
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now

        async def long_request():
            await asyncio.sleep(0.5)
            start, first, text = time.perf_counter(), None, []
            async for out in engine.generate(EngineRequest(long_ids, SamplingParams(max_tokens=20))):
                first = first or time.perf_counter() - start
                text.append(out.text)
            answers.append("".join(text))
            return first

        async def scenario(stream=stream, long_request=long_request):
            return (await asyncio.gather(*(stream() for _ in range(8)), long_request()))[-1]
        first = asyncio.run(scenario())
        engine.stop()
        print(f"8 streams beside a {len(long_ids)}-token prompt, prefill budget {budget}: longest gap between "
              f"stream tokens {1000 * max(gaps):.0f} ms (median {1000 * statistics.median(gaps):.0f} ms); "
              f"the long prompt's first token after {first:.2f} s")
    print(f"the long prompt's 20 greedy tokens, prefilled whole and in chunks, identical: {answers[0] == answers[1]}")


def main() -> int:
    loaded = load_model(Settings())
    print(f"{loaded.spec.name}, {loaded.device}, {loaded.dtype}, {torch.get_num_threads()} threads")
    # timings on this thread first: the later sections start engine threads of their own
    second_openmp_team(loaded)
    packed_weights(loaded, loaded.tokenizer)
    fused_projections(loaded)
    decode_profile(loaded)
    packed_generations(loaded, loaded.tokenizer)
    chunked_prefill(loaded, loaded.tokenizer)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
