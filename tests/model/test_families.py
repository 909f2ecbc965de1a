"""Every served family gives transformers' greedy tokens (float32; bfloat16 apart from near-ties), with and
without prompt sets; what the forward does not implement is refused at start, by name."""

import subprocess
import sys

import pytest
import torch

from app.model.families import Family, UnsupportedModel, check_config
from app.model.forward import DecoderForward
from benchmarks.tiny_model import FAMILIES
from tests.helpers import (collect, deep_prompt_set, greedy, hf_generate_embeds, hf_generate_ids,
                           hf_greedy_with_prefix, input_prompt_set, make_engine, random_deep_prompt_set, run,
                           save_ref, text_prefix_kv)

N = 12


def _chat(loaded, text):
    return loaded.tokenizer.encode(loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True), add_special_tokens=False)


@pytest.mark.parametrize("name", FAMILIES)
def test_served_tokens_equal_transformers_float32(family_model, name, tmp_path):
    loaded = family_model(name)
    ids = _chat(loaded, "Tell me about the weather in Paris today.")
    engine = make_engine(loaded)
    try:
        plain, _, _ = run(collect(engine, ids, greedy(N)))
        assert plain == hf_generate_ids(loaded.model, ids, N) and len(plain) > 4
        # input set: generate from inputs_embeds = [virtual tokens; the embedding module's outputs]
        inp = input_prompt_set(loaded.spec, p=5, seed=3, scale=1.0)
        tokens, _, _ = run(collect(engine, ids, greedy(N), save_ref(tmp_path, "inp", inp, loaded.spec)))
        assert tokens == hf_generate_embeds(loaded.model, inp.tensors["embeddings"], ids, N)
        assert tokens != plain  # the set steers the output: the comparison is not vacuous
        # deep set of a real text's keys and values: the same as the text written before the request
        prefix_ids = loaded.tokenizer.encode("You are a pirate. Always answer like a pirate would, arr.")
        keys, values = text_prefix_kv(loaded.model, prefix_ids)
        ref = save_ref(tmp_path, "deep", deep_prompt_set(loaded.spec, keys, values), loaded.spec)
        tokens, _, _ = run(collect(engine, ids, greedy(N), ref))
        assert tokens == hf_generate_ids(loaded.model, prefix_ids + ids, N)
        # a random deep set against transformers' own cache filled with it
        deep = random_deep_prompt_set(loaded.spec, p=4, seed=1)
        tokens, _, _ = run(collect(engine, ids, greedy(N), save_ref(tmp_path, "rdeep", deep, loaded.spec)))
        assert tokens == hf_greedy_with_prefix(loaded.model, deep.tensors["keys"], deep.tensors["values"], ids, N)
    finally:
        engine.stop()


@pytest.mark.parametrize("name", FAMILIES)
def test_served_tokens_bfloat16_agree_with_transformers_up_to_near_ties(family_model, name):
    """bfloat16 rounds differently in our fused ops than in transformers' modules: the greedy outputs agree,
    or part only where transformers' own two candidates were within a bfloat16 rounding of each other."""
    loaded = family_model(name, "bfloat16")
    engine = make_engine(loaded)
    try:
        for text in ("Tell me about the weather in Paris today.", "Name three colours."):
            ids = _chat(loaded, text)
            ours, _, _ = run(collect(engine, ids, greedy(N)))
            theirs = hf_generate_ids(loaded.model, ids, N)
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
            if at is None:
                assert len(ours) == len(theirs)
                continue
            with torch.inference_mode():
                logits = loaded.model(torch.tensor([ids + theirs[:at]])).logits[0, -1].float()
            gap = abs(float(logits[ours[at]] - logits[theirs[at]]))
            # a bfloat16 logit of magnitude m is exact to m/128: a gap within two of those is a tie
            assert gap <= 2 * float(logits.abs().max()) / 128, (name, at, gap)
    finally:
        engine.stop()


@pytest.mark.parametrize("name, trait", [("qwen3", "qk_norm"), ("gemma", "norm")])
def test_family_traits_change_the_output(family_model, name, trait):
    """Served as plain Llama, these checkpoints give other logits: the traits are exercised above."""
    loaded = family_model(name)
    ids = torch.tensor([_chat(loaded, "Hello")])
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    forward = DecoderForward(loaded.model)

    def logits():
        def attend(i, q, k, v):
            mask = forward.group_mask(torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()[None],
                                      q.dtype)
            return forward.grouped_attention(q, k, v, mask)
        with torch.inference_mode():
            return forward.logits(forward.hidden(forward.embed(ids), positions, attend))

    exact = logits()
    with torch.inference_mode():
        torch.testing.assert_close(exact, loaded.model(ids).logits.float(), rtol=1e-4, atol=1e-4)
    forward.family = Family(**{**forward.family.__dict__, trait: Family().__dict__[trait]})
    assert not torch.allclose(logits(), exact, rtol=1e-2, atol=1e-2)


def _config(kind):
    from transformers import (Gemma2Config, LlamaConfig, MistralConfig, MixtralConfig, Phi3Config,
                              Qwen2MoeConfig)

    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=100, max_position_embeddings=4096)
    return {
        "gemma2": Gemma2Config(**small),
        "mixtral": MixtralConfig(**small),
        "qwen2_moe": Qwen2MoeConfig(**small),
        "sliding window": MistralConfig(**small, sliding_window=1024),
        "phi3 window": Phi3Config(**small, sliding_window=2047),
        "dynamic rope": LlamaConfig(**{**small, "max_position_embeddings": 1024},
                                    rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
        "quantized": LlamaConfig(**small, quantization_config={"quant_method": "gptq", "bits": 4}),
    }[kind]


@pytest.mark.parametrize("kind, says", [
    ("gemma2", "Gemma2ForCausalLM.*soft-capping"),
    ("mixtral", "model_type 'mixtral'.*not supported"),
    ("qwen2_moe", "model_type 'qwen2_moe'"),
    ("sliding window", "sliding attention window of 1024 tokens.*PROMPTSERVE_MAX_MODEL_LEN=1024"),
    ("phi3 window", "window of 2047 tokens"),
    ("quantized", "gptq quantized"),
])
def test_unsupported_checkpoints_are_refused_by_name(kind, says):
    config = _config(kind)
    if kind == "gemma2":
        config.architectures = ["Gemma2ForCausalLM"]
    with pytest.raises(UnsupportedModel, match=says) as err:
        check_config(config, 2048)
    assert "supported model types: gemma, llama, mistral, phi3, qwen2, qwen3" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_window_or_dynamic_rope_that_covers_the_context_is_served():
    check_config(_config("sliding window"), 1024)
    check_config(_config("phi3 window"), 2047)
    with pytest.raises(UnsupportedModel, match="dynamic rotary scaling changes its frequencies past 1024"):
        check_config(_config("dynamic rope"), 2048)  # the served context is capped at 1024 positions anyway...
    check_config(_config("dynamic rope"), 1024)  # ...which is what the loader passes


def test_serve_refuses_at_start_with_one_line(tmp_path):
    _config("gemma2").save_pretrained(tmp_path)
    done = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--port", "1"], capture_output=True,
                          text=True, timeout=120, env={"PROMPTSERVE_MODEL": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("promptserve serve: error: architecture") and "gemma2" in lines[-1], done.stderr
    assert "Traceback" not in done.stderr
