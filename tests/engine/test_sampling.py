"""The sampler on its own: the batched draw follows the softmax, seeds reproduce whatever the batch,
transforms and grammars touch only their rows, and log-probabilities are of the raw logits."""

import torch

from app.engine.sampling import RowState, sample, sample_plain_rows
from app.engine.types import SamplingParams


def test_batched_draw_follows_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]])
    temperature = 0.7
    want = torch.softmax(logits[0] / temperature, -1)
    g = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.bincount(torch.tensor([sample_plain_rows(logits, [temperature], [g])[0] for _ in range(n)]),
                            minlength=5).float() / n
    assert counts[4] == 0  # a token of probability 0 is never drawn
    assert torch.allclose(counts, want, atol=0.015), (counts, want)


def test_a_seed_reproduces_its_row_whatever_the_batch():
    logits = torch.randn(6, 300)
    params = SamplingParams(temperature=1.0, seed=42)

    def rows(k):
        return [RowState(params, torch.Generator().manual_seed(42)) if i == 0 else
                RowState(SamplingParams(temperature=0.5), torch.Generator().manual_seed(i)) for i in range(k)]
    alone = [sample(logits[:1], rows(1))[0].token for _ in range(3)]
    in_batch = [sample(logits, rows(6))[0].token for _ in range(3)]
    assert alone == in_batch


def test_logit_bias_and_penalties_touch_only_their_row_and_logprobs_stay_raw():
    logits = torch.randn(3, 50)
    plain = RowState(SamplingParams(logprobs=2))
    biased = RowState(SamplingParams(logit_bias=((7, 100.0),), logprobs=0))
    penalized = RowState(SamplingParams(frequency_penalty=2.0), output_ids=[int(logits[2].argmax())])
    out = sample(logits, [plain, biased, penalized])
    assert out[0].token == int(logits[0].argmax()) and out[1].token == 7
    assert out[2].token != int(logits[2].argmax())
    raw = torch.log_softmax(logits[1], -1)
    assert abs(out[1].logprob.logprob - float(raw[7])) < 1e-6  # the bias is not in the reported logprob
    top = torch.topk(torch.log_softmax(logits[0], -1), 2)
    assert [t for t, _ in out[0].logprob.top] == top.indices.tolist()
