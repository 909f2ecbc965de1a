"""Speculative decoding (app/engine/speculation.py, ModelRunner._check_drafts): the n-gram index proposes what
followed the latest earlier occurrence of a sequence's tail; the engine's outputs are the same with it and
without it (greedy with log-probabilities, seeded sampling, penalties, stop strings, max_tokens, one and two
sequences at a time) while proposed tokens are in fact checked and kept; and it runs only where the check is
exact."""

import asyncio
from types import SimpleNamespace

import pytest

from app.engine.detokenizer import Detokenizer
from app.engine.engine import Engine
from app.engine.scheduler import Scheduler
from app.engine.speculation import NgramDrafter
from app.engine.types import EngineRequest, GenerationRequest, SamplingParams, Sequence
from app.model.loader import load_model
from app.settings import Settings
from tests.helpers import make_engine

# -- the n-gram index -----------------------------------------------------------------------------------


def test_proposes_what_followed_the_latest_earlier_occurrence():
    drafter = NgramDrafter([1, 2, 3, 4, 9, 2, 3, 5, 6, 7, 2, 3])
    assert drafter.propose(3) == [5, 6, 7]  # (2, 3) last occurred before 5, not before 4
    assert drafter.propose(1) == [5]
    assert drafter.propose(0) == []


def test_prefers_the_longest_match():
    drafter = NgramDrafter([7, 2, 3, 8, 1, 2, 3, 9, 5, 1, 2, 3])
    assert drafter.propose(2) == [9, 5]  # (1, 2, 3) matches before 9; (2, 3) alone last preceded 9 too
    drafter = NgramDrafter([5, 2, 3, 8, 1, 2, 3, 9, 0, 5, 2, 3])
    assert drafter.propose(1) == [8]  # (5, 2, 3) beats the more recent (2, 3) -> 9


def test_nothing_without_a_match_of_min_n_tokens():
    assert NgramDrafter([1, 2, 3, 4, 5]).propose(3) == []
    assert NgramDrafter([1, 2, 3, 1]).propose(3) == []  # one token is below MIN_NGRAM
    assert NgramDrafter([1, 2, 3, 1], min_n=1).propose(2) == [2, 3]
    assert NgramDrafter([]).propose(2) == []


def test_extending_equals_building_from_scratch():
    tokens = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3, 3, 8, 3, 2, 7, 9, 5, 3, 5]
    grown = NgramDrafter(tokens[:5])
    for i in range(5, len(tokens)):
        grown.extend([tokens[i]])
        assert grown.propose(3) == NgramDrafter(tokens[:i + 1]).propose(3)
    assert len(grown) == len(tokens)


# -- the scheduler takes several tokens a step ------------------------------------------------------------


def _running(scheduler, request_id, max_tokens, ignore_eos=False):
    seq = Sequence(GenerationRequest(request_id, [1, 2, 3], SamplingParams(max_tokens=max_tokens,
                                                                           ignore_eos=ignore_eos)))
    scheduler.add(seq)
    scheduler.schedule()
    scheduler.prefilled([seq])
    return seq


def test_tokens_after_the_one_a_sequence_ends_on_are_dropped():
    s = Scheduler(max_num_seqs=4, max_queue=8, stop_token_ids=frozenset({0}))
    a, b, c = _running(s, "a", 10), _running(s, "b", 3), _running(s, "c", 10, ignore_eos=True)
    finished = s.update_from_output({"a": [5, 0, 6], "b": [5, 6, 7, 8], "c": [5, 0, 6]})
    assert [f.request_id for f in finished] == ["a", "b"]
    assert (a.output_ids, a.num_new_tokens, a.finish_reason) == ([5, 0], 2, "stop")
    assert (b.output_ids, b.num_new_tokens, b.finish_reason) == ([5, 6, 7], 3, "length")
    assert (c.output_ids, c.num_new_tokens) == ([5, 0, 6], 3) and s.running == [c]


def test_a_stop_string_inside_a_steps_tokens_ends_the_output_there(smol):
    tok = smol.tokenizer
    ids = tok.encode(" red green blue white", add_special_tokens=False)
    stop_at = len(tok.encode(" red green", add_special_tokens=False))
    seq = Sequence(GenerationRequest("r", [1], SamplingParams(max_tokens=20, stop=(" blue",), logprobs=0)))
    seq.output_ids, seq.num_new_tokens = list(ids), len(ids)
    seq.new_logprobs = [SimpleNamespace(token=t) for t in ids]
    sub = SimpleNamespace(detok=Detokenizer(tok, (" blue",)))
    text, new, logprobs = Engine._detokenize_new(seq, sub, final=False)
    blue = len(tok.encode(" red green blue", add_special_tokens=False))
    assert text == " red green" and sub.detok.stopped
    assert new == ids[:blue] and seq.output_ids == ids[:blue] and len(logprobs) == blue > stop_at


# -- the engine: the same outputs with it and without it --------------------------------------------------
REPEATING = "one two three four, one two three four, one two three four, one two"


@pytest.fixture(scope="module")
def bf16(native_kernels):
    """The embedded SmolLM2 in bf16, as served: a real model continues a repeating text, so what is proposed
    is often kept (a tiny random one's output rarely repeats itself)."""
    if native_kernels.decode_layers is None:
        pytest.skip("no native decode op (neither AVX-512 nor AVX2): no exact check of several tokens, no speculation")
    return load_model(Settings(dtype="bfloat16", device="cpu"))


async def _outputs(engine, loaded, requests, together):
    async def one(text, params):
        ids = loaded.tokenizer.encode(text, add_special_tokens=False)
        tokens, logprobs, texts, last = [], [], [], None
        async for out in engine.generate(EngineRequest(ids, params)):
            tokens.extend(out.token_ids)
            logprobs.extend((lp.token_id, lp.logprob, lp.top) for lp in out.logprobs or [])
            texts.append(out.text)
            last = out
        return tokens, logprobs, "".join(texts), last.finish_reason, last.completion_tokens
    if together:  # two at a time: steps of two sequences, one proposed token each
        pairs = [requests[i:i + 2] for i in range(0, len(requests), 2)]
        return [out for pair in pairs for out in await asyncio.gather(*(one(t, p) for t, p in pair))]
    return [await one(t, p) for t, p in requests]


# in pairs with the same prompt: run two at a time, the pair's prefill is always one forward row (the second
# shares the first's), so nothing but speculation differs between the engines (bf16 prefill rounds a row
# differently beside other rows; the prompt cache is off for the same reason)
REQUESTS = [
    (REPEATING, SamplingParams(max_tokens=40, ignore_eos=True, logprobs=2)),
    (REPEATING, SamplingParams(max_tokens=40, temperature=0.9, seed=11, ignore_eos=True)),
    (REPEATING, SamplingParams(max_tokens=40, temperature=0.7, top_p=0.9, seed=3, ignore_eos=True)),
    (REPEATING, SamplingParams(max_tokens=30, repetition_penalty=1.3, presence_penalty=0.5, ignore_eos=True)),
    (REPEATING, SamplingParams(max_tokens=5, ignore_eos=True)),
    (REPEATING, SamplingParams(max_tokens=40)),  # eos active
    ("Name three colours.", SamplingParams(max_tokens=33, ignore_eos=True)),
    ("Name three colours.", SamplingParams(max_tokens=33, logprobs=1)),
]


def _with_stop_string(loaded, engine):
    """A stop string that the greedy output of REPEATING reaches after a few tokens, taken from that output."""
    tokens = asyncio.run(_outputs(engine, loaded, [(REPEATING, SamplingParams(max_tokens=24, ignore_eos=True))],
                                  False))[0][0]
    text = loaded.tokenizer.decode(tokens[8:12])
    return (REPEATING, SamplingParams(max_tokens=24, ignore_eos=True, stop=(text.strip()[:4] or text,)))


@pytest.mark.parametrize("together", [False, True])
def test_outputs_are_the_same_with_and_without_speculation(bf16, together):
    plain = make_engine(bf16, speculative_tokens=0, prompt_cache_bytes=0)
    speculating = make_engine(bf16, speculative_tokens=3, prompt_cache_bytes=0)
    try:
        assert speculating.runner.speculative_tokens == 3 and plain.runner.speculative_tokens == 0
        requests = REQUESTS + [_with_stop_string(bf16, plain)]
        without = asyncio.run(_outputs(plain, bf16, requests, together))
        checked_before = speculating.stats().speculative_draft_tokens
        with_it = asyncio.run(_outputs(speculating, bf16, requests, together))
        stats = speculating.stats()
    finally:
        plain.stop()
        speculating.stop()
    for got, want, (_, params) in zip(with_it, without, requests):
        assert got == want, params
    assert stats.speculative_draft_tokens > checked_before
    assert stats.speculative_accepted_tokens > 0, "the repeating prompt's continuation is proposed and kept"
    assert plain.stats().speculative_draft_tokens == 0


def test_several_tokens_a_step_reach_the_caller_and_save_steps(bf16):
    ids = bf16.tokenizer.encode(REPEATING, add_special_tokens=False)
    params = SamplingParams(max_tokens=48, ignore_eos=True)
    runs = {}
    for k in (0, 3):
        engine = make_engine(bf16, speculative_tokens=k)
        try:
            async def chunks():
                return [len(out.token_ids) async for out in engine.generate(EngineRequest(ids, params))]
            sizes = asyncio.run(chunks())
            runs[k] = (sizes, engine.stats())
        finally:
            engine.stop()
    assert sum(runs[0][0]) == sum(runs[3][0]) == 48
    assert max(runs[0][0]) == 1 and max(runs[3][0]) > 1
    accepted = runs[3][1].speculative_accepted_tokens
    assert runs[3][1].steps == runs[0][1].steps - accepted


def test_off_where_the_check_would_not_be_exact(tiny):
    """float32 (torch's matmuls): several rows in one pass may round differently, so nothing is proposed."""
    engine = make_engine(tiny, speculative_tokens=3)
    try:
        assert engine.runner.forward.speculative_rows == 1 and engine.runner.speculative_tokens == 0
    finally:
        engine.stop()
