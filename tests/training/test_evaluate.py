"""Dev evaluation through the server's HTTP API agrees with the in-process evaluation."""

import asyncio

import httpx
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
    from training.evaluate import classify_predictions, tune_binary_threshold
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
    shift, before, after = tune_binary_threshold(module, tiny.tokenizer, labels, rows, "spam", torch.device("cpu"))
    assert before == 0.0 and after > 0 and shift > 90  # the margin moved across the -100 offset
    assert torch.equal(module.head.weight, weight)
    pred = classify_predictions(module, tiny.tokenizer, labels, [r["text"] for r in rows], torch.device("cpu"))
    assert abs(class_f1([r["label"] for r in rows], pred, "spam")["f1"] - after) < 1e-9  # what it reported
    # tuned already: no further move
    assert tune_binary_threshold(module, tiny.tokenizer, labels, rows, "spam", torch.device("cpu"))[0] == 0.0
