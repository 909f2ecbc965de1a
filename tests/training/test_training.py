"""Short training runs on the tiny model: the loss goes down and the output is a servable prompt set."""

import pytest
import torch
from fastapi.testclient import TestClient

from app.api.main import create_app
from prompt_store import format as psf
from tests.api.conftest import ADMIN, make_settings
from training.run import run_training
from training.trainer import TrainConfig

SPAM = [{"text": f"WIN a FREE prize now call {i}", "label": "spam"} for i in range(12)] + \
       [{"text": f"see you at dinner {i}, love", "label": "ham"} for i in range(12)]
NER = [{"tokens": ["I", "met", "Anna", "in", "Rome"], "tags": ["O", "O", "B-person", "O", "B-geo-loc"]},
       {"tokens": ["Bob", "likes", "Paris"], "tags": ["B-person", "O", "B-geo-loc"]}] * 6
CHAT = [{"instruction": "Who are you?", "input": "", "output": "I am Aria."}] * 8


@pytest.mark.parametrize("task_type, rows, labels, kind, reparam", [
    ("classify", SPAM, ["spam", "ham"], "deep", False),
    ("classify", SPAM, ["spam", "ham"], "input", False),
    ("extract", NER, ["person", "geo-loc"], "deep", True),
    ("generate", CHAT, [], "input", False),
    ("generate", CHAT, [], "deep", True),
])
def test_short_run_lowers_loss_and_output_serves(tiny_model_dir, tiny, tmp_path, task_type, rows, labels, kind,
                                                 reparam):
    cfg = TrainConfig(task_type=task_type, labels=labels, kind=kind, num_virtual_tokens=4, reparam=reparam,
                      epochs=30 if task_type == "generate" else 6, batch_size=8, lr=3e-2, head_lr=1e-2, seed=0,
                      warmup=0.1)
    out = tmp_path / "ps.safetensors"
    res = run_training(tiny_model_dir, "t", out, kind, rows, cfg, torch.device("cpu"), torch.float32,
                       tiny.spec.name, progress=False)
    losses = res["stats"]
    assert losses["final_loss"] < 0.9 * losses["first_loss"]
    ps = psf.parse_for_model(out.read_bytes(), tiny.spec)  # the server's own validation
    assert ps.kind == kind and ps.meta.task_type == task_type and list(ps.meta.labels) == labels
    assert "mlp" not in str(list(ps.tensors))  # the reparameterization MLP is folded away on export
    with TestClient(create_app(make_settings(tmp_path, warmup=False), loaded=tiny)) as c:
        assert c.put("/admin/prompt-sets/t", content=out.read_bytes(), headers=ADMIN).status_code == 201
        body = {"text": rows[0]["text"] if task_type == "classify" else " ".join(rows[0].get("tokens", []))}
        if task_type == "generate":
            body = {"messages": [{"role": "user", "content": "Who are you?"}], "max_tokens": 4}
        r = c.post("/v1/tasks/t", json=body)
        assert r.status_code == 200, r.text


def test_training_is_reproducible(tiny_model_dir, tiny, tmp_path):
    cfg = TrainConfig(task_type="classify", labels=["spam", "ham"], kind="deep", num_virtual_tokens=3, epochs=1,
                      batch_size=8, seed=7)
    outs = []
    for i in range(2):
        out = tmp_path / f"{i}.safetensors"
        run_training(tiny_model_dir, "t", out, "deep", SPAM, cfg, torch.device("cpu"), torch.float32,
                     tiny.spec.name, progress=False)
        outs.append(psf.load(out).tensors)
    for name in outs[0]:
        torch.testing.assert_close(outs[0][name], outs[1][name])


def test_config_for_takes_a_preset_and_explicit_overrides():
    from training.run import config_for

    deep = config_for("spam", "deep")
    assert (deep.task_type, deep.labels, deep.lr, deep.epochs, deep.full_finetune) == \
        ("classify", ["spam", "ham"], 1e-2, 2.0, False)
    full = config_for("spam", None)
    assert full.full_finetune and full.base_lr == 3e-5 and full.init_text == ""
    assert config_for("chat", "input").init_text.startswith("You are Aria")
    custom = config_for(None, "input", lr=0.5, labels=["a"], epochs=3, seed=7)
    assert (custom.task_type, custom.lr, custom.labels, custom.epochs, custom.seed) == ("generate", 0.5, ["a"], 3, 7)


def test_balanced_class_weights_undo_the_label_frequencies():
    from training.data import Example
    from training.run import config_for
    from training.trainer import balanced_class_weights

    examples = [Example([1, 2], [t], [1]) for t in (0, 1, 1, 1)]  # one "spam", three "ham"
    weights = balanced_class_weights(examples, 2)
    assert torch.allclose(weights, torch.tensor([2.0, 2 / 3]))
    # each label's total weight is then the same: 1 x 2.0 == 3 x 2/3
    assert config_for("spam", "deep").class_weight == "balanced"  # the preset's
    assert config_for("ner", "deep").class_weight is None


def test_deep_set_from_an_init_text_starts_as_the_input_set_from_it(tiny_model_dir):
    """A deep prefix initialised with the init text's keys and values is the text itself before the request:
    the same hidden states as an input set whose virtual tokens are the text's embeddings."""
    from app.model.forward import DecoderForward
    from app.model.loader import load_checkpoint
    from app.model.spec import model_spec
    from training.prompt_module import PromptModule

    model, tokenizer = load_checkpoint(tiny_model_dir, torch.device("cpu"), torch.float32)
    spec = model_spec(model, "tiny")
    init_ids = tokenizer.encode("You are Aria, made by Acme.", add_special_tokens=False)
    ids = torch.tensor([tokenizer.encode("Who are you?", add_special_tokens=False)])
    hidden = {kind: PromptModule(DecoderForward(model), spec, kind, 5, init_ids=init_ids).hidden(ids)
              for kind in ("input", "deep")}
    torch.testing.assert_close(hidden["deep"], hidden["input"], atol=1e-5, rtol=1e-5)
    random_deep = PromptModule(DecoderForward(model), spec, "deep", 5).hidden(ids)
    assert not torch.allclose(random_deep, hidden["input"], atol=1e-3)
    with pytest.raises(ValueError, match="reparameterization"):
        PromptModule(DecoderForward(model), spec, "deep", 5, reparam=True, init_ids=init_ids)


def test_length_grouped_batches_cover_every_example_once_with_less_padding():
    import random

    from training.data import Example
    from training.trainer import _batches

    rng = random.Random(1)
    lengths = [rng.randint(5, 200) for _ in range(400)]
    examples = [Example(list(range(n)), [0], [0]) for n in lengths]

    def padded(group):
        batches = list(_batches(examples, 16, random.Random(0), group_by_length=group))
        assert sorted(id(e) for b in batches for e in b) == sorted(id(e) for e in examples)
        assert all(len(b) <= 16 for b in batches)
        return sum(max(len(e.ids) for e in b) * len(b) for b in batches)

    assert padded(True) < 0.7 * padded(False)
    assert padded(True) < 1.1 * sum(lengths)
    # the batch order is still shuffled: not longest first
    first = [max(len(e.ids) for e in b) for b in _batches(examples, 16, random.Random(0), group_by_length=True)]
    assert first != sorted(first, reverse=True)


def test_dev_selection_keeps_the_best_epochs_parameters(tiny_model_dir, tiny):
    from app.model.loader import load_checkpoint
    from app.model.spec import model_spec
    from training.data import build_examples
    from training.trainer import train

    model, tokenizer = load_checkpoint(tiny_model_dir, torch.device("cpu"), torch.float32)
    cfg = TrainConfig(task_type="classify", labels=["spam", "ham"], kind="deep", num_virtual_tokens=3, epochs=3,
                      batch_size=8, seed=0)
    examples = build_examples(tokenizer, SPAM, cfg.task_type, cfg.labels)
    scores, seen = iter([0.5, 0.9, 0.1]), []

    def evaluate(module):
        assert not module.training
        seen.append(module.prefix.detach().clone())
        return next(scores)

    result = train(model, model_spec(model, "tiny"), tokenizer, examples, cfg, torch.device("cpu"), progress=False,
                   evaluate=evaluate)
    assert [d["step"] for d in result.dev_scores] == [3, 6, 9] and result.kept_step == 6
    torch.testing.assert_close(result.module.prefix.detach(), seen[1])
    assert not torch.allclose(seen[1], seen[2])


def test_presets_select_on_dev_and_start_deep_sets_from_the_init_text():
    from training.run import config_for

    assert config_for("chat", "deep").init_text.startswith("You are Aria")
    assert config_for("chat", "deep", reparam=True).init_text == ""
    assert config_for("ner", "deep", init_text="Find entities.").init_text == "Find entities."
    assert config_for("chat", "deep", init_text="").init_text == ""
    with pytest.raises(ValueError, match="reparameterization"):
        config_for("ner", "deep", reparam=True, init_text="Find entities.")
    assert config_for("ner", "deep").select_on_dev and config_for("chat", "deep").select_on_dev
    assert not config_for("ner", "deep", select_on_dev=False).select_on_dev
    assert not config_for("spam", "deep").group_by_length  # the shipped spam set's recipe
    assert config_for("ner", "deep").group_by_length
