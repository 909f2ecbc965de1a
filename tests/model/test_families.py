"""Every served family gives transformers' greedy tokens (float32; bfloat16 apart from near-ties), with and
without prompt sets; what the forward does not implement is refused at start, by name."""

import subprocess
import sys

import pytest
import torch

from app.engine.types import EngineRequest, Mode
from app.model.families import Family, UnsupportedModel, check_config
from app.model.forward import DecoderForward
from benchmarks.tiny_model import FAMILIES
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
                logits = loaded.model(torch.tensor([ids + theirs[:at]], device=loaded.device)).logits[0, -1].float()
            gap = abs(float(logits[ours[at]] - logits[theirs[at]]))
            # a bfloat16 logit of magnitude m is exact to m/128: a gap within two of those is a tie
            assert gap <= 2 * float(logits.abs().max()) / 128, (name, at, gap)
    finally:
        engine.stop()


@pytest.mark.parametrize("name, trait", [("qwen3", "qk_norm"), ("gemma", "norm")])
def test_family_traits_change_the_output(family_model, name, trait):
    """Served as plain Llama, these checkpoints give other logits: the traits are exercised above."""
    loaded = family_model(name)
    ids = torch.tensor([_chat(loaded, "Hello")], device=loaded.device)
    positions = torch.arange(ids.shape[1], device=loaded.device).unsqueeze(0)
    forward = DecoderForward(loaded.model)

    def logits():
        def attend(i, q, k, v):
            mask = forward.group_mask(torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool,
                                                 device=q.device).tril()[None], q.dtype)
            return forward.grouped_attention(q, k, v, mask)
        with torch.inference_mode():
            return forward.logits(forward.hidden(forward.embed(ids), positions, attend))

    exact = logits()
    with torch.inference_mode():
        torch.testing.assert_close(exact, loaded.model(ids).logits.float(), rtol=1e-4, atol=1e-4)
    forward.family = Family(**{**forward.family.__dict__, trait: Family().__dict__[trait]})
    assert not torch.allclose(logits(), exact, rtol=1e-2, atol=1e-2)


def _config(kind):
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, MixtralConfig, Phi3Config, Qwen2MoeConfig

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


@pytest.mark.parametrize("name", FAMILIES)
def test_peft_adapters_import_and_serve_on_every_family(family_model, name, tmp_path):
    """PROMPT_TUNING and PREFIX_TUNING (PEFT's grouped-query layout) adapters made by PEFT on this family's
    model import to prompt sets whose served tokens equal the transformers reference."""
    from peft import PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model

    from prompt_store.peft_import import import_peft

    loaded = family_model(name)
    ids = loaded.tokenizer.encode("The quick brown fox jumps over")
    engine = make_engine(loaded)
    try:
        def imported(config, seed: int, path: str):
            torch.manual_seed(seed)
            peft_model = get_peft_model(loaded.model, config)
            peft_model.save_pretrained(tmp_path / path)
            return peft_model, import_peft(tmp_path / path, loaded.spec)

        peft_model, ps = imported(PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=6), 0, "pt")
        with torch.no_grad():
            emb = peft_model.get_prompt_embedding_to_save("default").float().cpu()
        torch.testing.assert_close(ps.tensors["embeddings"], emb)
        tokens, _, _ = run(collect(engine, ids, greedy(N), save_ref(tmp_path, "pt", ps, loaded.spec)))
        assert tokens == hf_generate_embeds(loaded.model, emb, ids, N)

        peft_model, ps = imported(PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4), 1,
                                  "prefix")
        with torch.no_grad():
            cache = peft_model.get_prompt(batch_size=1)
        for layer in range(loaded.spec.num_layers):
            torch.testing.assert_close(ps.tensors["keys"][layer], cache.layers[layer].keys[0].float().cpu())
            torch.testing.assert_close(ps.tensors["values"][layer], cache.layers[layer].values[0].float().cpu())
        tokens, _, _ = run(collect(engine, ids, greedy(N), save_ref(tmp_path, "prefix", ps, loaded.spec)))
        assert tokens == hf_greedy_with_prefix(loaded.model, ps.tensors["keys"], ps.tensors["values"], ids, N)
    finally:
        engine.stop()


@pytest.mark.parametrize("name", FAMILIES)
def test_heads_serve_transformers_hidden_states(family_model, name, tmp_path):
    """classify and extract heads over a deep set read the final hidden state transformers computes for the
    same prefix and tokens (its last hidden_states entry, after the final norm)."""
    from tests.helpers import head_prompt_set

    loaded = family_model(name)
    ids = loaded.tokenizer.encode("Win a free prize now, call us")
    ps = head_prompt_set(loaded.spec, "classify", ["spam", "ham"], 2, seed=5)
    keys, values = ps.tensors["keys"], ps.tensors["values"]
    from transformers import DynamicCache
    cache = DynamicCache(config=loaded.model.config)
    for layer in range(keys.shape[0]):
        cache.update(keys[layer][None].to(loaded.device), values[layer][None].to(loaded.device), layer)
    p = keys.shape[2]
    dev = loaded.device
    with torch.inference_mode():
        out = loaded.model(input_ids=torch.tensor([ids], device=dev), past_key_values=cache, use_cache=True,
                           position_ids=torch.arange(p, p + len(ids), device=dev)[None], output_hidden_states=True,
                           attention_mask=torch.ones(1, p + len(ids), dtype=torch.long, device=dev))
    hidden = out.hidden_states[-1][0].float().cpu()
    logits = hidden @ ps.tensors["head.weight"].T + ps.tensors["head.bias"]
    engine = make_engine(loaded)
    try:
        ref = save_ref(tmp_path, "cls", ps, loaded.spec)
        outs = run(_all(engine.generate(EngineRequest(ids, greedy(1), ref, Mode.CLASSIFY))))
        torch.testing.assert_close(torch.tensor(outs[-1].scores), torch.softmax(logits[-1], -1), rtol=1e-4,
                                   atol=1e-5)
        positions = [0, 3, len(ids) - 1]
        outs = run(_all(engine.generate(EngineRequest(ids, greedy(1), ref, Mode.TAG, positions))))
        torch.testing.assert_close(torch.tensor(outs[-1].tag_logprobs), torch.log_softmax(logits[positions], -1),
                                   rtol=1e-4, atol=1e-4)
    finally:
        engine.stop()


async def _all(stream):
    return [out async for out in stream]


@pytest.mark.parametrize("name", FAMILIES)
def test_training_a_few_steps_gives_a_set_the_server_takes(family_model, name, tmp_path):
    """`promptserve train` on this family: a few steps of a deep classify set and an input generate set,
    both accepted by the server's validation (shape and fingerprint) and served through the HTTP API."""
    from fastapi.testclient import TestClient

    from app.api.main import create_app
    from prompt_store import format as psf
    from tests.api.conftest import ADMIN, make_settings
    from training.run import run_training
    from training.trainer import TrainConfig

    loaded = family_model(name)
    spam = [{"text": f"WIN a FREE prize now call {i}", "label": "spam"} for i in range(6)] + \
           [{"text": f"see you at dinner {i}, love", "label": "ham"} for i in range(6)]
    chat = [{"instruction": "Who are you?", "input": "", "output": "I am Aria."}] * 4
    runs = [("cls", "classify", spam, ["spam", "ham"], "deep", "WIN a FREE prize"),
            ("gen", "generate", chat, [], "input", "You are Aria")]
    with TestClient(create_app(make_settings(tmp_path, warmup=False), loaded=loaded)) as client:
        for task, task_type, rows, labels, kind, init_text in runs:
            cfg = TrainConfig(task_type=task_type, labels=labels, kind=kind, num_virtual_tokens=3, epochs=1,
                              batch_size=4, lr=1e-2, seed=0, max_steps=3, init_text=init_text)
            out = tmp_path / f"{task}.safetensors"
            res = run_training(family_model.dir(name), task, out, kind, rows, cfg, loaded.device,
                               torch.float32, loaded.spec.name, progress=False)
            assert torch.isfinite(torch.tensor(res["stats"]["final_loss"]))
            ps = psf.parse_for_model(out.read_bytes(), loaded.spec)
            assert ps.meta.base_model == loaded.spec.fingerprint
            assert client.put(f"/admin/prompt-sets/{task}", content=out.read_bytes(),
                              headers=ADMIN).status_code == 201
        r = client.post("/v1/tasks/cls", json={"text": "WIN a FREE prize now"})
        assert r.status_code == 200 and set(r.json()["scores"]) == {"spam", "ham"}, r.text
        r = client.post("/v1/tasks/gen", json={"messages": [{"role": "user", "content": "Who are you?"}],
                                               "max_tokens": 3})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("name", FAMILIES)
def test_fingerprint_is_the_same_in_float32_and_bfloat16_and_differs_between_families(family_model, name):
    assert family_model(name).spec.fingerprint == family_model(name, "bfloat16").spec.fingerprint
    others = {family_model(other).spec.fingerprint for other in FAMILIES if other != name}
    assert family_model(name).spec.fingerprint not in others
