"""The prompt cache: beginnings of prompts computed once, copied into later rows that begin the same way."""

import asyncio

import pytest
import torch

from app.engine.prompt_cache import PromptCache
from app.engine.scheduler import Scheduler
from app.engine.types import EngineRequest, GenerationRequest, SamplingParams, Sequence
from tests.helpers import greedy, make_engine, random_deep_prompt_set, save_ref

LAYERS, KVH, HD = 2, 1, 4


def kv(tokens: int, fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys/values [L, kvh, tokens, hd] whose position t holds t + fill (to tell positions apart)."""
    k = torch.arange(tokens, dtype=torch.float32).view(1, 1, tokens, 1).expand(LAYERS, KVH, tokens, HD) + fill
    return k.contiguous(), (-k).contiguous()


def test_blocks_are_found_only_behind_the_same_prompt_set_and_the_same_tokens():
    cache = PromptCache(1 << 20, block_tokens=4)
    tokens = list(range(100, 111))  # 11 tokens: two whole blocks are kept, the last 3 tokens are not
    cache.store("set-a", tokens, *kv(11))
    assert len(cache) == 2
    hit = cache.match("set-a", tokens)
    keys, values = kv(11)
    assert hit.tokens == 8 and torch.equal(hit.keys, keys[:, :, :8]) and torch.equal(hit.values, values[:, :, :8])
    assert cache.match("set-b", tokens) is None  # another prompt set: its keys and values differ
    assert cache.match(None, tokens) is None  # the bare model likewise
    changed = tokens[:5] + [7] + tokens[6:]  # the second block differs: only the first is reused
    assert cache.match("set-a", changed).tokens == 4
    assert cache.match("set-a", [1] + tokens[1:]) is None  # a different first token: nothing
    # the prompt's last token is always computed (its hidden state gives the first output token)
    assert cache.match("set-a", tokens[:8]).tokens == 4
    assert cache.match("set-a", tokens[:9]).tokens == 8


def test_least_recently_used_blocks_leave_first_within_the_byte_bound():
    block_bytes = 2 * LAYERS * KVH * 4 * HD * 4  # keys and values of one 4-token block, float32
    cache = PromptCache(8 * block_bytes, block_tokens=4)
    prompts = [list(range(100 * i, 100 * i + 9)) for i in range(5)]  # 2 blocks each
    for p in prompts[:4]:
        cache.store("s", p, *kv(9))
    assert len(cache) == 8
    assert cache.match("s", prompts[0]).tokens == 8  # the first prompt's blocks are now the most recent
    cache.store("s", prompts[4], *kv(9))  # 2 more: the least recently used, the second prompt's, make room
    assert len(cache) == 8 and cache.resident_bytes() <= 8 * block_bytes
    assert cache.match("s", prompts[1]) is None
    assert all(cache.match("s", p).tokens == 8 for p in (prompts[0], prompts[2], prompts[3], prompts[4]))


def test_one_prompt_keeps_at_most_its_first_quarter_of_the_cache():
    block_bytes = 2 * LAYERS * KVH * 4 * HD * 4
    cache = PromptCache(8 * block_bytes, block_tokens=4)
    cache.store("s", list(range(50, 90)), *kv(40))  # 10 blocks: only the first 2 are kept
    cache.store("s", list(range(40)), *kv(40))
    assert len(cache) == 4 and cache.match("s", list(range(40))).tokens == 8
    small = PromptCache(3 * block_bytes, block_tokens=4)  # a quarter of it is less than one block
    small.store("s", list(range(40)), *kv(40))
    assert len(small) == 0


def test_an_empty_budget_turns_the_cache_off():
    cache = PromptCache(0)
    cache.store("s", list(range(40)), *kv(40))
    assert not cache.enabled and len(cache) == 0 and cache.match("s", list(range(40))) is None


def test_the_scheduler_schedules_only_what_the_cache_does_not_hold():
    cached = PromptCache(1 << 20, block_tokens=4)
    cached.store(None, list(range(12)), *kv(12))
    s = Scheduler(max_num_seqs=4, max_queue=4, max_prefill_tokens=12,
                  match_prompt=lambda seq: cached.match(None, seq.request.prompt_token_ids))
    # 20 prompt tokens beginning with the stored prompt's first two blocks (its third differs): 8 cached,
    # 12 to prefill, within the step's budget
    seq = Sequence(GenerationRequest("a", list(range(8)) + list(range(100, 112)), SamplingParams(max_tokens=2)))
    s.add(seq)
    out = s.schedule()
    assert out.prefills == [seq] and s.partial is None  # without the cache it would have been chunked
    assert seq.num_computed_tokens == 8 and seq.num_scheduled_tokens == 12 and seq.starts_row
    assert seq.prefill_range == (8, 20) and seq.prefill_ends_prompt
    s.prefilled([seq])
    assert seq.num_computed_tokens == 20 and not seq.starts_row


async def _tokens(engine, ids, ref, n=10, **sampling):
    out = []
    async for o in engine.generate(EngineRequest(ids, greedy(n, ignore_eos=True, **sampling), ref)):
        out.extend(o.token_ids)
    return out


@pytest.mark.parametrize("step_tokens", [1024, 5], ids=["whole", "chunked"])
def test_a_prompt_that_begins_like_an_earlier_one_decodes_exactly_as_without_the_cache(tiny, tmp_path, step_tokens):
    """float32: the second prompt's first blocks come from the first prompt's prefill, and its tokens are
    those of an engine without the cache; another prompt set's request with the same text reuses nothing.
    chunked: a 5-token step budget, so the rest after the cached blocks is still prefilled in chunks (in the
    staging row, which starts with the copied blocks)."""
    spec, tok = tiny.spec, tiny.tokenizer
    ref = save_ref(tmp_path, "deep", random_deep_prompt_set(spec, 4, seed=3, scale=0.5), spec)
    other = save_ref(tmp_path, "other", random_deep_prompt_set(spec, 4, seed=4, scale=0.5), spec)
    opening = "You are a careful assistant. Answer in one short sentence, politely and without lists. "
    first, second = (tok.encode(opening + q) for q in ("What is the capital of France?", "Why is snow white?"))
    shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert shared >= 16, "the two prompts must share whole blocks"
    plain = make_engine(tiny, prompt_cache_bytes=0)
    try:
        expected = [asyncio.run(_tokens(plain, ids, r)) for ids, r in ((first, ref), (second, ref), (second, other))]
    finally:
        plain.stop()
    engine = make_engine(tiny, max_prefill_tokens=step_tokens)
    try:
        cache = engine.runner.prompts
        assert asyncio.run(_tokens(engine, first, ref)) == expected[0]
        assert cache.hit_tokens == 0 and len(cache) > 0
        assert asyncio.run(_tokens(engine, second, ref)) == expected[1]
        reused = cache.hit_tokens
        assert shared - 8 < reused <= shared  # every whole block of the shared opening
        assert asyncio.run(_tokens(engine, second, other)) == expected[2]
        assert cache.hit_tokens == reused  # nothing of the first prompt set's blocks
        assert engine.runner.cache.num_used == 0
    finally:
        engine.stop()


def test_requests_that_read_their_prompt_positions_neither_use_nor_fill_the_cache(tiny):
    tok = tiny.tokenizer
    ids = tok.encode("You are a careful assistant. Answer in one short sentence, politely and without lists. Hi")
    engine = make_engine(tiny)
    try:
        cache = engine.runner.prompts
        scored = asyncio.run(_tokens(engine, ids, None, prompt_logprobs=0))  # prompt log-probabilities
        assert len(cache) == 0 and cache.prompt_tokens == 0
        asyncio.run(_tokens(engine, ids, None))
        assert len(cache) > 0
        assert asyncio.run(_tokens(engine, ids, None, prompt_logprobs=0)) == scored
        assert cache.hit_tokens == 0
    finally:
        engine.stop()
