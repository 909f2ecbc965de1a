"""The engine's step order and its work between steps (tiny model, float32)."""

import asyncio
import threading

import pytest

from app.engine.engine import Engine, EngineConfig
from app.engine.types import EngineRequest
from prompt_store.format import PromptSetError
from tests.helpers import greedy, input_prompt_set, make_engine, save_ref


def test_first_token_of_a_new_request_goes_out_before_the_batch_decodes(tiny):
    """A step with both runs the prefill, streams its first tokens, then decodes the running batch."""
    engine = Engine(tiny, EngineConfig(max_num_seqs=4, max_model_len=128))  # stepped by hand, no loop
    events: list[tuple] = []
    real_put, real_decode = engine._put, engine.runner.decode

    def put(sub, out):
        events.append(("out", out.request_id))
        real_put(sub, out)

    def decode(seqs):
        events.append(("decode", tuple(s.request_id for s in seqs)))
        return real_decode(seqs)

    engine._put, engine.runner.decode = put, decode
    ids = tiny.tokenizer.encode("Hello there")

    async def scenario():
        _, first = engine.submit(EngineRequest(ids, greedy(5, ignore_eos=True)), request_id="running")
        engine.step()  # prefill of "running"
        engine.submit(EngineRequest(ids, greedy(5, ignore_eos=True)), request_id="new")
        events.clear()
        engine.step()  # prefill of "new" and decode of "running" in one step
        await asyncio.sleep(0)
        return first

    asyncio.run(scenario())
    assert events == [("out", "new"), ("decode", ("running",)), ("out", "running")]


def test_later_steps_decode_both_rows_and_match_separate_runs(tiny):
    """After a prefill-first step the new sequence sits after the running ones; both go on correctly."""
    engine = make_engine(tiny, max_num_seqs=4)
    ids_a, ids_b = tiny.tokenizer.encode("Hello there"), tiny.tokenizer.encode("Write a poem")

    async def run(ids, wait=None):
        if wait is not None:
            await wait.wait()
        tokens = []
        async for out in engine.generate(EngineRequest(ids, greedy(8, ignore_eos=True))):
            tokens.extend(out.token_ids)
        return tokens

    try:
        alone = [asyncio.run(run(ids_a)), asyncio.run(run(ids_b))]

        async def together():
            go = asyncio.Event()

            async def first():
                tokens = []
                async for out in engine.generate(EngineRequest(ids_a, greedy(8, ignore_eos=True))):
                    tokens.extend(out.token_ids)
                    if len(tokens) == 3:
                        go.set()
                return tokens
            return list(await asyncio.gather(first(), run(ids_b, go)))

        assert asyncio.run(together()) == alone
    finally:
        engine.stop()


def test_calls_run_on_the_engine_thread_once_the_loop_runs_and_fail_after_stop(tiny):
    engine = Engine(tiny, EngineConfig(max_num_seqs=2, max_model_len=64))
    early = engine.call(threading.current_thread)  # made before the loop starts: waits for it
    assert not early.done()
    engine.start()
    try:
        assert early.result(timeout=30).name == "promptserve-engine"
        with pytest.raises(ZeroDivisionError):  # fn's own error reaches the caller; the loop goes on
            engine.call(lambda: 1 / 0).result(timeout=30)
        assert engine.call(lambda: 42).result(timeout=30) == 42
        nested = engine.call(lambda: engine.call(lambda: 7).result(timeout=5))  # from the engine thread itself
        assert nested.result(timeout=30) == 7
    finally:
        engine.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        engine.call(lambda: 1).result(timeout=1)


def test_preload_makes_a_prompt_set_resident_on_the_engine_thread(tiny, tmp_path):
    ref = save_ref(tmp_path, "t", input_prompt_set(tiny.spec, 3, seed=1), tiny.spec)
    engine = make_engine(tiny)
    try:
        engine.preload(ref).result(timeout=30)
        assert ref.key in engine.runner.prefixes and engine.runner.prefixes.misses == 1
        missing = save_ref(tmp_path, "gone", input_prompt_set(tiny.spec, 3), tiny.spec)
        (tmp_path / "gone-v1.safetensors").unlink()
        with pytest.raises(PromptSetError, match="no longer stored"):  # reaches the caller; the loop goes on
            engine.preload(missing).result(timeout=30)

        async def one():
            async for out in engine.generate(EngineRequest(tiny.tokenizer.encode("Hi"), greedy(2), ref)):
                pass
            return out
        assert asyncio.run(one()).finish_reason == "length" and engine.runner.prefixes.hits == 1
    finally:
        engine.stop()
