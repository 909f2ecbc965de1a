"""A request's greedy output is the same alone or in a mixed batch, joining mid-decode (float32)."""

import asyncio

import pytest

from app.engine.types import EngineRequest
from tests.helpers import greedy, input_prompt_set, make_engine, random_deep_prompt_set, save_ref


@pytest.fixture(params=["tiny", pytest.param("smol", marks=pytest.mark.real_model)])
def loaded(request):
    return request.getfixturevalue(request.param)


def _requests(loaded, tmp_path):
    spec, tok = loaded.spec, loaded.tokenizer
    inp3 = save_ref(tmp_path, "a", input_prompt_set(spec, 3, seed=1, scale=0.5), spec)
    inp9 = save_ref(tmp_path, "b", input_prompt_set(spec, 9, seed=2, scale=0.5), spec)
    deep4 = save_ref(tmp_path, "c", random_deep_prompt_set(spec, 4, seed=3, scale=0.5), spec)
    deep11 = save_ref(tmp_path, "d", random_deep_prompt_set(spec, 11, seed=4, scale=0.5), spec)
    texts = ["Hello there, how are you?", "List three colours.", "What is 2+2?", "Write a haiku about rain.",
             "Name a city in Spain.", "Why is the sky blue?"]
    refs = [None, inp3, deep4, inp9, deep11, None]
    return [(tok.encode(t), ref) for t, ref in zip(texts, refs)]


async def _run(engine, ids, ref, n, start: asyncio.Event | None = None, progress: list | None = None):
    if start is not None:
        await start.wait()
    tokens = []
    async for out in engine.generate(EngineRequest(ids, greedy(n, ignore_eos=True), ref)):
        tokens.extend(out.token_ids)
        for k, event in progress or []:  # let the next request join once this one is k tokens in
            if len(tokens) >= k:
                event.set()
    return tokens


@pytest.mark.parametrize("native", [True, False], ids=["native-kernels", "torch-ops"])
def test_mixed_batch_equals_alone(loaded, tmp_path, native):
    """torch-ops: the engine without the native kernels (an image without a compiler): SDPA with masks,
    the padded prefill layout for attention."""
    reqs = _requests(loaded, tmp_path)
    n = 16
    engine = make_engine(loaded) if native else make_engine(loaded, kernel_cache_dir=None)
    try:
        alone = [asyncio.run(_run(engine, ids, ref, n)) for ids, ref in reqs]

        async def together():
            # request i joins when the first request has decoded 2*i tokens: always mid-decode
            events = [asyncio.Event() for _ in reqs[1:]]
            progress = [(2 * (i + 1), e) for i, e in enumerate(events)]
            first = _run(engine, *reqs[0], n, progress=progress)
            rest = (_run(engine, ids, ref, n, start=e) for (ids, ref), e in zip(reqs[1:], events))
            return await asyncio.gather(first, *rest)

        steps_before = engine.steps
        mixed = asyncio.run(together())
        steps = engine.steps - steps_before
    finally:
        engine.stop()
    assert mixed == alone
    assert all(len(t) == n for t in alone)
    # they really shared batches: far fewer steps than running them one after another
    assert steps < len(reqs) * n


def test_chunked_prefill_equals_whole_prefill(tiny, tmp_path):
    """With a 3-token step budget every prompt here is prefilled in chunks (the first row alone in the
    staging row), while the others decode; outputs are those of whole-prompt prefills."""
    reqs = _requests(tiny, tmp_path)
    assert all(len(ids) > 3 for ids, _ in reqs)
    n = 8
    whole = make_engine(tiny)
    try:
        alone = [asyncio.run(_run(whole, ids, ref, n)) for ids, ref in reqs]
    finally:
        whole.stop()
    chunked = make_engine(tiny, max_prefill_tokens=3)
    try:
        async def together():
            events = [asyncio.Event() for _ in reqs[1:]]
            progress = [(i + 1, e) for i, e in enumerate(events)]
            first = _run(chunked, *reqs[0], n, progress=progress)
            rest = (_run(chunked, ids, ref, n, start=e) for (ids, ref), e in zip(reqs[1:], events))
            return await asyncio.gather(first, *rest)

        assert asyncio.run(together()) == alone
        assert [asyncio.run(_run(chunked, ids, ref, n)) for ids, ref in reqs] == alone
        assert chunked.scheduler.partial is None and chunked.runner.cache.num_used == 0
    finally:
        chunked.stop()


def test_identical_prompts_share_one_prefill_and_decode_as_if_alone(tiny, tmp_path):
    """n choices of one request (the same prompt and prompt set) admitted in one step are prefilled once:
    the copies take the leader's cache row. Each then decodes exactly as the prompt alone would (float32).
    The engine is stepped by hand, so the four are admitted together whatever the timing."""
    import asyncio

    from app.engine.engine import Engine, EngineConfig
    from tests.helpers import collect, greedy, make_engine, random_deep_prompt_set, save_ref

    ref = save_ref(tmp_path, "shared", random_deep_prompt_set(tiny.spec, 4, seed=3), tiny.spec)
    ids = tiny.tokenizer.encode("Once upon a time")
    running = make_engine(tiny)
    try:
        alone = asyncio.run(collect(running, ids, greedy(12, ignore_eos=True), ref))[0]
    finally:
        running.stop()
    engine = Engine(tiny, EngineConfig(max_num_seqs=8, max_model_len=512))  # no loop: stepped below
    forwarded = []
    real_hidden = engine.runner.forward.hidden

    def counting(x, *a, **k):  # x: embeddings [rows, tokens, hidden]; a prefill has several tokens
        if x.shape[1] > 1:
            forwarded.append(x.shape[0])
        return real_hidden(x, *a, **k)
    engine.runner.forward.hidden = counting

    async def together():
        queues = [engine.submit(EngineRequest(ids, greedy(12, ignore_eos=True), ref))[1] for _ in range(4)]
        while engine.scheduler.has_work():
            engine.step()
        await asyncio.sleep(0)
        outs = []
        for q in queues:
            tokens = []
            while not q.empty():
                tokens.extend(q.get_nowait().token_ids)
            outs.append(tokens)
        return outs
    outs = asyncio.run(together())
    assert outs == [alone] * 4
    assert sum(forwarded) == 1, f"prefill forwards ran {forwarded} rows for 4 identical prompts (want one row)"
