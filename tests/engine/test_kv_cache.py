"""The KV cache within a memory budget: its arithmetic, growth that keeps what is cached, admission that waits
for room, and outputs that do not depend on the budget."""

import asyncio

import pytest
import torch

from app.engine.kv_cache import LENGTH_STEP, KVCache, KVCacheTooSmall
from app.engine.scheduler import Scheduler
from app.engine.types import GenerationRequest, SamplingParams, Sequence
from tests.helpers import collect, greedy, make_engine, run

LAYERS, KVH, HD = 2, 1, 4
POSITION = 2 * LAYERS * KVH * HD * 4  # float32 bytes of one position's keys and values in every layer


def cache(rows=8, max_len=1024, budget=None):
    return KVCache(LAYERS, rows, KVH, max_len, HD, torch.float32, torch.device("cpu"), budget)


def test_a_budget_below_one_full_context_is_refused_by_name():
    one = POSITION * 2 * (1024 + 1)  # a row and the staging row, the full context and its spare position
    with pytest.raises(KVCacheTooSmall, match="PROMPTSERVE_KV_CACHE_MB"):
        cache(budget=one - 1)
    assert cache(budget=one).budget_bytes == one


def test_starts_small_and_fits_counts_rows_times_the_longest_reservation():
    c = cache(budget=POSITION * 2 * 1025 * 4)
    assert c.allocated_bytes <= POSITION * 5 * LENGTH_STEP  # not rows x the full context
    assert c.fits(7, 100)  # 8 rows of 256 positions
    assert not c.fits(9, 100)  # more rows than the batch has
    assert c.fits(3, 1000) and not c.fits(8, 1000)


def test_growth_keeps_every_row_and_the_staging_row():
    c = cache(rows=16, budget=None)
    for i in range(3):
        row = c.allocate(f"r{i}", reserved=10)
        c.k[:, row, :, :5] = i + 1
        c.set_length(row, 5)
    staged = c.allocate_staging("s", reserved=700)
    c.k[:, staged, :, :5] = 9
    c.set_length(staged, 5)
    c.ensure(10, 700)
    assert c.row_capacity >= 10 and c.length_capacity >= 701
    for i in range(3):
        assert (c.k[:, c.row_of(f"r{i}"), :, :5] == i + 1).all()
    assert (c.k[:, c.row_of("s"), :, :5] == 9).all()
    row = c.commit_staging()
    assert (c.k[:, row, :, :5] == 9).all() and c.longest_reserved == 700


def test_shrinks_when_idle():
    c = cache(rows=16)
    c.ensure(12, 900)
    grown = c.allocated_bytes
    c.allocate("a", 900)
    c.shrink_if_idle()
    assert c.allocated_bytes == grown  # a sequence is in it
    c.release("a")
    c.shrink_if_idle()
    assert c.allocated_bytes < grown


def test_the_scheduler_admits_while_the_budget_holds_and_in_order():
    room = {"rows": 2}
    s = Scheduler(max_num_seqs=8, max_queue=8, fits=lambda rows, longest: rows <= room["rows"])
    for r in "abcd":
        s.add(Sequence(GenerationRequest(r, [5, 6], SamplingParams(max_tokens=3))))
    assert [x.request_id for x in s.schedule().prefills] == ["a", "b"]
    s.update_from_output({"a": [7], "b": [7]})
    assert not s.schedule().prefills  # no room: c waits
    s.finish(s.running[0], "stop")
    assert [x.request_id for x in s.schedule().prefills] == ["c"]


def test_outputs_under_a_tight_budget_equal_the_unbounded_ones(tiny):
    """Eight requests through a budget that holds two sequences of the full context at a time (or more of
    their own length): every answer equals the unbounded engine's, and the cache never passes its budget."""
    prompts = [[1 + i, 20 + i, 30, 40 + 2 * i] for i in range(8)]
    free = make_engine(tiny, max_num_seqs=8, max_model_len=512)
    try:
        async def all_free():
            return await asyncio.gather(*(collect(free, p, greedy(24, ignore_eos=True)) for p in prompts))
        expected = run(all_free())
    finally:
        free.stop()
    probe = KVCache(len(free.runner.forward.layers), 8, free.runner.forward.num_kv_heads, 512,
                    free.runner.forward.head_dim, tiny.dtype, tiny.device)
    budget = probe.bytes_for(2, 512)
    bounded = make_engine(tiny, max_num_seqs=8, max_model_len=512, kv_cache_bytes=budget)
    peak = []

    async def watch():
        while True:
            peak.append(bounded.stats().kv_cache_bytes)
            await asyncio.sleep(0.001)

    async def go():
        watcher = asyncio.ensure_future(watch())
        try:
            return await asyncio.gather(*(collect(bounded, p, greedy(24, ignore_eos=True)) for p in prompts))
        finally:
            watcher.cancel()
    try:
        got = run(go())
    finally:
        bounded.stop()
    assert [g[0] for g in got] == [e[0] for e in expected]
    assert max(peak) <= budget
