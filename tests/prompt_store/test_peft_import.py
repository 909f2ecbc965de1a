"""PEFT prompt-learning adapters import to prompt sets that serve the same result as the reference."""

import pytest
import torch
from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType, get_peft_model

from prompt_store.format import PromptSetError
from prompt_store.peft_import import import_peft
from tests.helpers import collect, greedy, hf_generate_embeds, hf_greedy_with_prefix, make_engine, run, save_ref

N = 10


def _adapter(loaded, config, tmp_path, name, seed=0):
    torch.manual_seed(seed)
    peft_model = get_peft_model(loaded.model, config)
    out = tmp_path / name
    peft_model.save_pretrained(out)
    return peft_model, out


@pytest.fixture
def engine(tiny):
    e = make_engine(tiny)
    yield e
    e.stop()


@pytest.fixture
def ids(tiny):
    return tiny.tokenizer.encode("The quick brown fox jumps over")


@pytest.mark.parametrize("config", [
    PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=6),
    PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5, encoder_hidden_size=32),
], ids=["prompt_tuning", "p_tuning"])
def test_input_adapters_serve_like_inputs_embeds(tiny, engine, ids, tmp_path, config):
    peft_model, path = _adapter(tiny, config, tmp_path, "adapter")
    ps = import_peft(path, tiny.spec)
    assert ps.kind == "input" and ps.meta.num_virtual_tokens == config.num_virtual_tokens
    with torch.no_grad():
        expected_emb = peft_model.get_prompt_embedding_to_save("default").float()
    torch.testing.assert_close(ps.tensors["embeddings"], expected_emb)
    tokens, _, _ = run(collect(engine, ids, greedy(N), save_ref(tmp_path, "t", ps, tiny.spec)))
    assert tokens == hf_generate_embeds(tiny.model, expected_emb, ids, N)


def test_prefix_tuning_adapter_uses_peft_gqa_layout(tiny, engine, ids, tmp_path):
    assert tiny.spec.num_kv_heads < tiny.model.config.num_attention_heads  # GQA really exercised
    config = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)
    peft_model, path = _adapter(tiny, config, tmp_path, "prefix")
    ps = import_peft(path, tiny.spec)
    assert ps.kind == "deep"
    assert list(ps.tensors["keys"].shape) == [tiny.spec.num_layers, tiny.spec.num_kv_heads, 4, tiny.spec.head_dim]
    # PEFT's own conversion of the same weights into a per-layer cache is the layout reference.
    with torch.no_grad():
        cache = peft_model.get_prompt(batch_size=1)
    for layer in range(tiny.spec.num_layers):
        torch.testing.assert_close(ps.tensors["keys"][layer], cache.layers[layer].keys[0].float())
        torch.testing.assert_close(ps.tensors["values"][layer], cache.layers[layer].values[0].float())
    tokens, _, _ = run(collect(engine, ids, greedy(N), save_ref(tmp_path, "p", ps, tiny.spec)))
    assert tokens == hf_greedy_with_prefix(tiny.model, ps.tensors["keys"], ps.tensors["values"], ids, N)


def test_not_a_peft_adapter_is_refused(tiny, tmp_path):
    with pytest.raises(PromptSetError, match="adapter_config.json"):
        import_peft(tmp_path, tiny.spec)


@pytest.mark.parametrize("config", [
    PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=6),
    PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4),
], ids=["prompt_tuning", "prefix_tuning"])
@pytest.mark.xfail(strict=True, reason="known upstream failure: PeftModel.generate with prompt-learning adapters "
                   "diverges from the reference on transformers 5.24 (it agreed on 5.23); our served output "
                   "matches the transformers reference in the tests above")
def test_served_import_agrees_with_peft_own_generate(tiny, engine, ids, tmp_path, config):
    """PEFT's own generate, which users would otherwise rely on, against our served output."""
    peft_model, path = _adapter(tiny, config, tmp_path, "adapter")
    with torch.no_grad():
        out = peft_model.generate(input_ids=torch.tensor([ids]), max_new_tokens=N, do_sample=False,
                                  attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    assert out[0, :len(ids)].tolist() == ids  # PEFT returns the prompt ids, then the new tokens
    peft_tokens = out[0, len(ids):].tolist()
    ps = import_peft(path, tiny.spec)
    tokens, _, _ = run(collect(engine, ids, greedy(N), save_ref(tmp_path, "x", ps, tiny.spec)))
    assert tokens == peft_tokens
