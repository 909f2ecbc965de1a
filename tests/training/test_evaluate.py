"""Dev evaluation through the server's HTTP API agrees with the in-process evaluation."""

import asyncio

import httpx
import pytest
import torch

from prompt_store.format import PromptSetMeta
from tests.api.conftest import ADMIN, live_server  # noqa: F401 (a fixture)
from training.evaluate import answer_loss, answer_loss_http, server_tokenizer

ROWS = [{"instruction": "Who are you?", "input": "", "output": "I am Aria, made by Acme Widgets."},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 + 3 = 5."},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}]}]


def test_held_out_answer_loss_through_the_server_equals_the_in_process_one(live_server, tiny):  # noqa: F811
    from app.model.forward import DecoderForward
    from training.prompt_module import PromptModule

    url, _ = live_server
    init_ids = tiny.tokenizer.encode("You are Aria.", add_special_tokens=False)
    module = PromptModule(DecoderForward(tiny.model), tiny.spec, "deep", 4, init_ids=init_ids)
    with torch.no_grad():  # not the text's own prefix: a set that a bare model could not imitate
        module.prefix.mul_(1.5)
    meta = PromptSetMeta(kind="deep", num_virtual_tokens=4, task_type="generate", labels=(),
                         base_model=tiny.spec.fingerprint, base_model_name=tiny.spec.name)
    blob = module.export(meta).to_bytes(tiny.spec)
    assert httpx.put(f"{url}/admin/prompt-sets/aria", content=blob,
                     headers={**ADMIN, "Content-Type": "application/octet-stream"}).status_code == 201

    async def through_http():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            tokenizer = await server_tokenizer(client)
            return (await answer_loss_http(client, "aria", tokenizer, ROWS, 2),
                    await answer_loss_http(client, tiny.spec.name, tokenizer, ROWS, 2))

    served, bare = asyncio.run(through_http())
    in_process = answer_loss(module, tiny.tokenizer, ROWS, torch.device("cpu"))
    bare_in_process = answer_loss(PromptModule(DecoderForward(tiny.model), tiny.spec, None, 0), tiny.tokenizer, ROWS,
                                  torch.device("cpu"))
    assert abs(served - in_process) < 1e-3 * in_process
    assert abs(bare - bare_in_process) < 1e-3 * bare_in_process
    assert abs(served - bare) > 1e-2  # the prompt set is applied


def test_binary_threshold_tuning_moves_only_the_head_biases(tiny):
    from app.model.forward import DecoderForward
    from training.evaluate import (
        binary_margins,
        choose_threshold,
        classify_predictions,
        served_binary_f1,
        tune_binary_threshold,
    )
    from training.metrics import class_f1
    from training.prompt_module import PromptModule

    torch.manual_seed(0)
    module = PromptModule(DecoderForward(tiny.model), tiny.spec, "deep", 2, head_rows=2)
    labels = ["ham", "spam"]
    rows = [{"text": f"message number {i} " + "win " * (i % 4), "label": "spam" if i % 4 == 3 else "ham"}
            for i in range(24)]
    with torch.no_grad():
        module.head.bias.copy_(torch.tensor([50.0, -50.0]))  # says ham to everything: spam F1 0
    weight = module.head.weight.clone()
    choice = tune_binary_threshold(module, tiny.tokenizer, labels, rows, "spam", torch.device("cpu"))
    assert choice.exact_before == 0.0 and choice.exact_after > 0 and choice.shift > 90  # across the -100 offset
    assert torch.equal(module.head.weight, weight)
    pred = classify_predictions(module, tiny.tokenizer, labels, [r["text"] for r in rows], torch.device("cpu"))
    assert abs(class_f1([r["label"] for r in rows], pred, "spam")["f1"] - choice.exact_after) < 1e-9  # as reported
    # tuned already: no further move
    assert tune_binary_threshold(module, tiny.tokenizer, labels, rows, "spam", torch.device("cpu")).shift == 0.0
    # a set scored as it stands: its own decision point's F1, the head untouched (though a shift would help)
    bias = module.head.bias.clone()
    module.head.bias.data += torch.tensor([5.0, -5.0])
    margins = binary_margins(module, tiny.tokenizer, labels, rows, "spam", torch.device("cpu"))
    off = choose_threshold(margins, [r["label"] == "spam" for r in rows], 0.25)
    assert off.shift and off.expected_after > off.expected_before
    assert served_binary_f1(module, tiny.tokenizer, labels, rows, "spam", torch.device("cpu"), 0.25) == \
        pytest.approx(off.expected_before)
    assert torch.equal(module.head.bias, bias + torch.tensor([5.0, -5.0]))


def test_decision_point_leaves_a_gap_narrower_than_the_serving_noise():
    from training.evaluate import choose_threshold, serving_margin_noise

    # the two rows at 1.0 (positive) and 0.9 (negative) are split only by a 0.1-wide gap
    margins, positive = [3.0, 1.0, 0.9, -3.0, -3.5], [True, True, False, False, False]
    exact = choose_threshold(margins, positive, 0.0)
    assert exact.exact_after == 1.0 and -1.0 < exact.shift < -0.9  # in the narrow gap
    # with noise of 0.5 that split is a coin flip (expected F1 0.77 with the point in the gap): a point
    # below both rows and well above the negatives' -3 is the better bet (0.8 for sure)
    at_gap = choose_threshold([m - 0.95 for m in margins], positive, 0.5)  # the same rows, the point in the gap
    assert at_gap.exact_before == 1.0 and at_gap.expected_before < 0.78
    assert at_gap.shift > 0.5 and at_gap.exact_after == 0.8 and at_gap.expected_after > 0.8
    assert 0.9 - 0.95 + at_gap.shift > 0.5 and -3.0 - 0.95 + at_gap.shift < -2.0  # well inside the wide gap
    assert serving_margin_noise(torch.bfloat16) == 0.25 and serving_margin_noise(torch.float32) < 1e-5


def test_expected_f1_without_noise_is_the_f1():
    from training.evaluate import expected_f1

    margins = torch.tensor([2.0, 0.5, -0.2, -1.0], dtype=torch.float64)
    positive = torch.tensor([True, False, True, False])
    shifts = torch.tensor([0.0, 0.3, -1.0, 5.0], dtype=torch.float64)
    # at 0: said positive {2.0, 0.5}: tp 1 fp 1 fn 1 -> 0.5; +0.3: {2.0, 0.5, -0.2(+0.3>0)}: tp 2 fp 1 -> 0.8;
    # -1.0: {2.0}: tp 1 fn 1 -> 2/3; +5: all: tp 2 fp 2 -> 4/6
    assert expected_f1(margins, positive, shifts, 0.0).tolist() == pytest.approx([0.5, 0.8, 2 / 3, 2 / 3])
    assert expected_f1(margins, positive, shifts, 1e-6).tolist() == pytest.approx([0.5, 0.8, 2 / 3, 2 / 3])
