"""Served greedy output equals the plain-transformers reference (float32)."""

import pytest

from tests.helpers import (
    collect,
    deep_prompt_set,
    greedy,
    hf_generate_embeds,
    hf_generate_ids,
    hf_greedy_with_prefix,
    input_prompt_set,
    make_engine,
    random_deep_prompt_set,
    run,
    save_ref,
    text_prefix_kv,
)

N = 12


@pytest.fixture(params=["tiny", pytest.param("smol", marks=pytest.mark.real_model)])
def loaded(request):
    return request.getfixturevalue(request.param)


@pytest.fixture
def engine(loaded):
    e = make_engine(loaded)
    yield e
    e.stop()


def _ids(loaded, text="Tell me about the weather in Paris today.", chat=True):
    if chat:  # the instruct model ends a raw-text prompt at once; a chat turn gives a real answer
        text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                    add_generation_prompt=True)
    return loaded.tokenizer.encode(text, add_special_tokens=False)


def test_no_prompt_set_matches_plain_generate(loaded, engine):
    ids = _ids(loaded)
    tokens, _, final = run(collect(engine, ids, greedy(N)))
    assert tokens == hf_generate_ids(loaded.model, ids, N)
    assert len(tokens) > 4


def test_input_prompt_set_matches_inputs_embeds_generate(loaded, engine, tmp_path):
    # Virtual tokens = the embeddings of a real instruction, slightly perturbed: they steer the real model.
    sys_ids = _ids(loaded, "<|im_start|>system\nAlways answer in French.<|im_end|>\n", chat=False)
    emb = loaded.model.get_input_embeddings().weight[sys_ids].detach().clone()
    ps = input_prompt_set(loaded.spec, p=len(sys_ids), seed=3, scale=0.01)
    ps.tensors["embeddings"] += emb
    ref = save_ref(tmp_path, "inp", ps, loaded.spec)
    ids = _ids(loaded)
    tokens, _, _ = run(collect(engine, ids, greedy(N), ref))
    assert tokens == hf_generate_embeds(loaded.model, ps.tensors["embeddings"], ids, N)
    # and the prompt set really changes the output (the test would pass vacuously otherwise)
    assert tokens != hf_generate_ids(loaded.model, ids, N)


def test_deep_prefix_of_real_text_equals_text_prepended(loaded, engine, tmp_path):
    prefix_ids = _ids(loaded,
                      "<|im_start|>system\nYou are a pirate. Always answer like a pirate would, arr.<|im_end|>\n",
                      chat=False)
    keys, values = text_prefix_kv(loaded.model, prefix_ids)
    ref = save_ref(tmp_path, "deep", deep_prompt_set(loaded.spec, keys, values), loaded.spec)
    ids = _ids(loaded, "<|im_start|>user\nWhat is your favourite food?<|im_end|>\n<|im_start|>assistant\n",
                 chat=False)
    tokens, _, _ = run(collect(engine, ids, greedy(N), ref))
    assert tokens == hf_generate_ids(loaded.model, prefix_ids + ids, N)
    assert tokens != hf_generate_ids(loaded.model, ids, N)


def test_random_deep_prefix_matches_transformers_cache(loaded, engine, tmp_path):
    ps = random_deep_prompt_set(loaded.spec, p=5, seed=1)
    ref = save_ref(tmp_path, "rdeep", ps, loaded.spec)
    ids = _ids(loaded)
    tokens, _, _ = run(collect(engine, ids, greedy(N), ref))
    assert tokens == hf_greedy_with_prefix(loaded.model, ps.tensors["keys"], ps.tensors["values"], ids, N)
