"""The scheduler on its own: no model, no threads."""

import pytest

from app.engine.scheduler import QueueFull, Scheduler
from app.engine.types import GenerationRequest, SamplingParams, SeqStatus, Sequence

EOS = 2


def seq(rid, max_tokens=3, ignore_eos=False):
    return Sequence(GenerationRequest(rid, [5, 6], SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos)))


def make(**kw):
    return Scheduler(**{"max_num_seqs": 2, "max_queue": 3, "max_prefills_per_step": 4,
                        "stop_token_ids": frozenset({EOS}), **kw})


def test_admits_up_to_batch_size_then_decodes():
    s = make()
    for r in "abc":
        s.add(seq(r))
    out = s.schedule()
    assert [x.request_id for x in out.prefills] == ["a", "b"] and not out.decodes
    s.update_from_output({"a": [7], "b": [7]})
    out = s.schedule()
    assert not out.prefills and [x.request_id for x in out.decodes] == ["a", "b"]
    assert s.num_waiting == 1


def test_finishes_on_length_and_eos_and_frees_rows():
    s = make()
    s.add(seq("a", max_tokens=2))
    s.add(seq("b"))
    s.add(seq("c"))
    s.schedule()
    assert [f.request_id for f in s.update_from_output({"a": [7], "b": [EOS]})] == ["b"]
    out = s.schedule()
    assert [x.request_id for x in out.prefills] == ["c"]  # b's eos freed a row
    finished = s.update_from_output({"a": [8], "c": [9]})
    assert [f.request_id for f in finished] == ["a"] and finished[0].finish_reason == "length"


def test_eos_reason_and_ignore_eos():
    s = make()
    s.add(seq("a"))
    s.add(seq("b", ignore_eos=True))
    s.schedule()
    finished = s.update_from_output({"a": [EOS], "b": [EOS]})
    assert [(f.request_id, f.finish_reason) for f in finished] == [("a", "stop")]
    assert s.running[0].request_id == "b" and s.running[0].output_ids == [EOS]


def test_queue_is_bounded():
    s = make(max_queue=2)
    s.add(seq("a"))
    s.add(seq("b"))
    with pytest.raises(QueueFull):
        s.add(seq("c"))


def test_aborts_apply_between_steps_waiting_and_running():
    s = make(max_num_seqs=1)
    s.add(seq("a"))
    s.add(seq("b"))
    s.schedule()
    s.abort("a")
    s.abort("b")
    out = s.schedule()
    assert sorted(x.request_id for x in out.aborted) == ["a", "b"]
    assert all(x.status is SeqStatus.FINISHED and x.finish_reason == "abort" for x in out.aborted)
    assert out.empty and not s.has_work()


def test_prefills_per_step_are_capped():
    s = make(max_num_seqs=8, max_queue=8, max_prefills_per_step=2)
    for r in "abcde":
        s.add(seq(r))
    assert len(s.schedule().prefills) == 2
    assert len(s.schedule().prefills) == 2


def test_prefill_batch_is_bounded_by_padded_tokens():
    s = make(max_num_seqs=8, max_queue=8, max_prefills_per_step=8, max_prefill_tokens=10)
    for r in "abcd":
        s.add(seq(r))  # 2 prompt tokens each
    s.add(Sequence(GenerationRequest("long", list(range(9)), SamplingParams())))
    assert [x.request_id for x in s.schedule().prefills] == ["a", "b", "c", "d"]  # 4 x 2 <= 10
    assert [x.request_id for x in s.schedule().prefills] == ["long"]  # always at least one


def long_seq(rid, n, max_tokens=3):
    return Sequence(GenerationRequest(rid, list(range(10, 10 + n)), SamplingParams(max_tokens=max_tokens)))


def test_a_prompt_over_the_budget_is_prefilled_in_chunks_while_the_batch_decodes():
    s = make(max_num_seqs=3, max_prefill_tokens=4)
    s.add(seq("a", max_tokens=10))
    out = s.schedule()
    s.prefilled(out.prefills)
    s.update_from_output({"a": [7]})
    s.add(long_seq("long", 10))
    s.add(seq("b"))
    chunks = []
    for _ in range(3):
        out = s.schedule()
        assert [x.request_id for x in out.decodes] == ["a"]  # the running stream keeps going
        assert [x.request_id for x in out.prefills] == ["long"]  # and b waits behind the long prompt
        chunks.append(out.prefills[0].prefill_range)
        s.prefilled(out.prefills)
        s.update_from_output({"a": [8]} if len(chunks) < 3 else {"a": [8], "long": [9]})
        if len(chunks) == 1:
            s.abort("nobody")
    assert chunks == [(0, 4), (4, 8), (8, 10)]
    # the computed-token count is the prompt's once it ran, and nothing is scheduled for it any more
    assert (s.running[1].num_computed_tokens, s.running[1].num_scheduled_tokens) == (10, 0)
    assert s.partial is None and [x.request_id for x in s.running] == ["a", "long"]
    assert s.running[1].output_ids == [9] and s.running[0].output_ids == [7, 8, 8, 8]
    out = s.schedule()
    assert [x.request_id for x in out.prefills] == ["b"] and [x.request_id for x in out.decodes] == ["a", "long"]


def test_aborting_a_partial_prompt_frees_the_scheduler():
    s = make(max_prefill_tokens=4)
    s.add(long_seq("long", 9))
    s.add(seq("b"))
    out = s.schedule()
    s.prefilled(out.prefills)
    s.abort("long")
    out = s.schedule()
    assert [x.request_id for x in out.aborted] == ["long"] and out.aborted[0].finish_reason == "abort"
    assert [x.request_id for x in out.prefills] == ["b"] and s.partial is None


def test_padded_prompts_share_a_step_only_within_the_budget():
    s = make(max_num_seqs=4, max_prefill_tokens=5)
    for r in "abc":
        s.add(seq(r))  # 2 tokens each: two fit in 5 padded tokens, three do not
    assert [x.request_id for x in s.schedule().prefills] == ["a", "b"]
