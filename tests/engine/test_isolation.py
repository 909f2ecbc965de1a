"""A request never fails because of another: a step that raises is retried without the request it blames,
and every sampling value the API accepts samples (fuzzed, with a neighbour whose output must not move)."""

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.engine.types import EngineRequest, SamplingParams
from tests.helpers import collect, greedy, make_engine

PROMPTS = ["Hello there", "The capital of France is", "1, 2, 3,", "Once upon a time"]


@pytest.fixture(scope="module")
def engine(tiny):
    e = make_engine(tiny)
    yield e
    e.stop()


@pytest.fixture(scope="module")
def solo(engine, tiny):
    """Each prompt's greedy output alone."""
    return {p: asyncio.run(collect(engine, tiny.tokenizer.encode(p), greedy(12, ignore_eos=True)))[0] for p in PROMPTS}


async def _together(engine, tiny, poisoned_prompt: str | None = None, extra=None):
    jobs = [collect(engine, tiny.tokenizer.encode(p), greedy(12, ignore_eos=True)) for p in PROMPTS]
    if extra is not None:
        jobs.append(extra)
    return await asyncio.gather(*jobs)


def _poison(monkeypatch, runner, phase: str, victim_ids: set[str], after_tokens: int = 0):
    """Make the runner's prefill or decode raise whenever a victim is in the batch (after it has
    `after_tokens` outputs), as a hostile input or an engine bug tied to one request would."""
    original = getattr(runner, f"_{phase}")

    def wrapped(seqs, *args):
        if any(s.request_id in victim_ids and len(s.output_ids) >= after_tokens for s in seqs):
            raise RuntimeError("poisoned")
        return original(seqs, *args)
    monkeypatch.setattr(runner, f"_{phase}", wrapped)


@pytest.mark.parametrize("phase,after", [("prefill", 0), ("decode", 3)])
def test_a_failing_step_fails_only_the_request_it_blames(engine, tiny, solo, monkeypatch, phase, after):
    _poison(monkeypatch, engine.runner, phase, {"victim"}, after)

    async def victim():
        outs = []
        async for out in engine.generate(EngineRequest(tiny.tokenizer.encode("poison"), greedy(12, ignore_eos=True)),
                                         request_id="victim"):
            outs.append(out)
        return outs

    *neighbours, victim_outs = asyncio.run(_together(engine, tiny, extra=victim()))
    assert victim_outs[-1].finish_reason == "error" and "poisoned" in victim_outs[-1].error
    for prompt, (tokens, _, final) in zip(PROMPTS, neighbours):
        assert final.finish_reason == "length" and tokens == solo[prompt]
    assert engine.runner.cache.num_used == 0  # every row released


sampling_fields = st.builds(
    SamplingParams, max_tokens=st.integers(1, 6),
    temperature=st.one_of(st.just(0.0), st.sampled_from([5e-324, 1e-40, 1e-6, 1e-5, 2.0, 5.0]),
                          st.floats(0, 5, allow_nan=False)),
    top_p=st.one_of(st.just(1.0), st.sampled_from([5e-324, 1e-9]), st.floats(1e-12, 1.0)),
    top_k=st.one_of(st.just(0), st.integers(1, 3), st.integers(1, 10**6)),
    seed=st.one_of(st.none(), st.integers(0, 2**63 - 1)),
    stop=st.lists(st.text(min_size=1, max_size=3), max_size=3).map(tuple),
    ignore_eos=st.booleans())


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(params=sampling_fields)
def test_every_sampling_value_samples_and_leaves_the_neighbours_alone(engine, tiny, solo, params):
    *neighbours, (tokens, _, final) = asyncio.run(
        _together(engine, tiny, extra=collect(engine, tiny.tokenizer.encode("fuzz"), params)))
    assert final.finish_reason in ("stop", "length"), final
    assert len(tokens) <= params.max_tokens
    for prompt, (got, _, _) in zip(PROMPTS, neighbours):
        assert got == solo[prompt]


def test_out_of_vocabulary_token_ids_are_refused_before_a_step(engine, tiny):
    from app.engine.engine import InvalidEngineRequest

    async def submit(ids):
        async for _ in engine.generate(EngineRequest(ids, greedy(2))):
            pass
    for ids in ([engine.runner.forward.vocab_size], [-1], [5, 10**9]):
        with pytest.raises(InvalidEngineRequest):
            asyncio.run(submit(ids))
