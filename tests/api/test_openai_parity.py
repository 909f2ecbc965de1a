"""OpenAI parity on the tiny model, in process: structured outputs, logprobs against a float32 reference,
n and prompt batches, penalties and logit_bias, tools, strict validation, models, tokenizer access."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient

from app.api.main import create_app
from tests.api.conftest import ADMIN, make_settings
from tests.helpers import head_prompt_set


@pytest.fixture(scope="module")
def api(tiny, tmp_path_factory):
    settings = make_settings(tmp_path_factory.mktemp("parity"), max_num_seqs=16, max_model_len=512)
    with TestClient(create_app(settings, loaded=tiny)) as c:
        yield c


def chat(api, model, **kw):
    return api.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}],
                                                  **kw})


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "size", "tags", "owner"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "size": {"type": "string", "enum": ["small", "large"]},
                         "tags": {"type": "array", "maxItems": 3,
                                  "items": {"type": "integer", "minimum": 0, "maximum": 99}},
                         "owner": {"type": "object", "additionalProperties": False, "required": ["id"],
                                   "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999}}}}}


def test_json_schema_is_always_followed_even_by_a_random_model(api, tiny):
    """A random model picks tokens with no regard for JSON: every answer is valid only by the grammar."""
    import jsonschema

    r = chat(api, tiny.spec.name, n=8, temperature=1.0, max_tokens=120, seed=3,
             response_format={"type": "json_schema",
                              "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}})
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)


@pytest.mark.parametrize("fmt,check", [
    ({"structured_outputs": {"choice": ["spam", "ham"]}}, lambda t: t in ("spam", "ham")),
    ({"structured_outputs": {"regex": r"[0-9]{3}-[a-z]{2}"}},
     lambda t: len(t) == 6 and t[3] == "-" and t[:3].isdigit()),
    ({"guided_grammar": 'root ::= "yes" | "no"'}, lambda t: t in ("yes", "no")),
    # a random model never closes an unbounded string: that the output opens an object is what it can show
    ({"response_format": {"type": "json_object"}}, lambda t: t.startswith("{")),
])
def test_other_output_formats_on_both_endpoints_and_the_task_endpoint(api, tiny, fmt, check):
    name = tiny.spec.name
    r = chat(api, name, temperature=1.0, seed=5, max_tokens=200, **fmt)
    assert r.status_code == 200 and check(r.json()["choices"][0]["message"]["content"]), r.text
    r = api.post("/v1/completions", json={"model": name, "prompt": "x", "temperature": 1.0, "seed": 5,
                                          "max_tokens": 200, **fmt})
    assert r.status_code == 200 and check(r.json()["choices"][0]["text"]), r.text
    task_fmt = {k: v for k, v in fmt.items() if k in ("structured_outputs", "response_format")}
    if task_fmt:
        r = api.post(f"/v1/tasks/{name}", json={"prompt": "x", "temperature": 1.0, "seed": 5, "max_tokens": 200,
                                                **task_fmt})
        assert r.status_code == 200 and check(r.json()["text"]), r.text


def test_bad_grammars_and_two_formats_are_refused_by_name(api, tiny):
    r = chat(api, tiny.spec.name, structured_outputs={"regex": "(["})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_grammar"
    assert r.json()["error"]["param"] == "structured_outputs"
    r = chat(api, tiny.spec.name, response_format={"type": "json_object"}, guided_regex="a+")
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_regex"
    r = chat(api, tiny.spec.name, response_format={"type": "json_schema"})
    assert r.status_code == 400


@torch.no_grad()
def _reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def test_logprobs_equal_a_float32_transformers_reference(api, tiny):
    """Prompt tokens (echo) and output tokens: log-softmax of the model's own logits, to 1e-3."""
    r = api.post("/v1/completions", json={
        "model": tiny.spec.name, "prompt": "The quick brown fox jumps", "max_tokens": 6, "temperature": 0,
        "echo": True, "logprobs": 3, "ignore_eos": True, "return_tokens_as_token_ids": True})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    ids = [int(t.removeprefix("token_id:")) for t in lp["tokens"]]
    prompt_ids = api.post("/tokenize", json={"prompt": "The quick brown fox jumps"}).json()["tokens"]
    assert ids[:len(prompt_ids)] == prompt_ids and len(ids) == len(prompt_ids) + 6
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing precedes the first token
    ref = _reference_logprobs(tiny.model, ids)
    for pos in range(1, len(ids)):
        assert lp["token_logprobs"][pos] == pytest.approx(float(ref[pos - 1, ids[pos]]), abs=1e-3), pos
        top = {int(k.removeprefix("token_id:")): v for k, v in lp["top_logprobs"][pos].items()}
        values, indices = torch.topk(ref[pos - 1], 3)
        for token, value in zip(indices.tolist(), values.tolist()):
            assert top[token] == pytest.approx(value, abs=1e-3), (pos, token)


def test_chat_logprobs_and_top_logprobs(api, tiny):
    r = chat(api, tiny.spec.name, logprobs=True, top_logprobs=5, max_tokens=4, temperature=0, ignore_eos=True)
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for entry in content:
        assert len(entry["top_logprobs"]) == 5 and entry["logprob"] <= 0
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][-1]["logprob"]
        assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"], abs=1e-5)  # greedy: the top one
        assert bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"]
    assert chat(api, tiny.spec.name, logprobs=True, top_logprobs=21).status_code == 400
    assert chat(api, tiny.spec.name, top_logprobs=2).status_code == 400  # top_logprobs needs logprobs


def test_max_tokens_zero_scores_the_prompt_only(api, tiny):
    r = api.post("/v1/completions", json={"model": tiny.spec.name, "prompt": "a b c d", "max_tokens": 0,
                                          "echo": True, "logprobs": 1})
    choice = r.json()["choices"][0]
    assert r.status_code == 200 and choice["text"] == "a b c d" and choice["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 0 and None not in choice["logprobs"]["token_logprobs"][1:]


def test_n_choices_and_prompt_batches(api, tiny):
    name = tiny.spec.name
    r = chat(api, name, n=3, temperature=1.0, seed=11, max_tokens=8, ignore_eos=True)
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2] and len({c["message"]["content"] for c in choices}) > 1
    again = chat(api, name, n=3, temperature=1.0, seed=11, max_tokens=8, ignore_eos=True).json()["choices"]
    assert [c["message"]["content"] for c in again] == [c["message"]["content"] for c in choices]  # seeded
    one = api.post("/v1/completions", json={"model": name, "prompt": "alpha", "max_tokens": 5, "temperature": 0,
                                            "ignore_eos": True}).json()["choices"][0]["text"]
    two = api.post("/v1/completions", json={"model": name, "prompt": "beta", "max_tokens": 5, "temperature": 0,
                                            "ignore_eos": True}).json()["choices"][0]["text"]
    batch = api.post("/v1/completions", json={"model": name, "prompt": ["alpha", "beta"], "max_tokens": 5,
                                              "temperature": 0, "ignore_eos": True, "n": 2}).json()
    assert [c["text"] for c in batch["choices"]] == [one, one, two, two]
    ids = api.post("/tokenize", json={"prompt": "alpha"}).json()["tokens"]
    by_ids = api.post("/v1/completions", json={"model": name, "prompt": [ids, ids], "max_tokens": 5,
                                               "temperature": 0, "ignore_eos": True}).json()
    assert [c["text"] for c in by_ids["choices"]] == [one, one]
    assert batch["usage"]["completion_tokens"] == 20


def test_streamed_n_choices_interleave_and_finish(api, tiny):
    with api.stream("POST", "/v1/chat/completions", json={
            "model": tiny.spec.name, "messages": [{"role": "user", "content": "hi"}], "n": 2, "max_tokens": 6,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    finished = {c["index"] for e in events for c in e["choices"] if c.get("finish_reason")}
    assert finished == {0, 1} and events[-1]["usage"]["completion_tokens"] == 12


def test_penalties_logit_bias_and_min_p(api, tiny):
    name = tiny.spec.name
    base = api.post("/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 4, "temperature": 0,
                                             "ignore_eos": True, "logprobs": 0}).json()["choices"][0]
    forced = api.post("/tokenize", json={"prompt": " zebra", "add_special_tokens": False}).json()["tokens"][0]
    biased = api.post("/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 4, "temperature": 0,
                                               "ignore_eos": True, "logit_bias": {str(forced): 100}}).json()
    assert api.post("/tokenize", json={"prompt": biased["choices"][0]["text"], "add_special_tokens": False}
                    ).json()["tokens"] == [forced] * 4
    # a strong frequency penalty forbids repeating any generated token
    text = api.post("/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 12, "temperature": 0,
                                             "ignore_eos": True, "frequency_penalty": 2.0, "logprobs": 0}).json()
    tokens = text["choices"][0]["logprobs"]["tokens"]
    assert len(set(tokens)) == len(tokens), tokens
    assert base["text"]
    for bad in ({"frequency_penalty": 5}, {"presence_penalty": -3}, {"repetition_penalty": 0}, {"min_p": 2},
                {"logit_bias": {"abc": 1}}, {"logit_bias": {"5": 101}}):
        r = api.post("/v1/completions", json={"model": name, "prompt": "x", **bad})
        assert r.status_code == 400 and r.json()["error"]["param"], (bad, r.text)
    ok = api.post("/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 3, "min_p": 0.5,
                                           "repetition_penalty": 1.3, "presence_penalty": 1, "temperature": 0.8})
    assert ok.status_code == 200


def test_tool_choice_required_and_named_give_valid_calls(api, tiny):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "required": ["city"], "additionalProperties": False,
        "properties": {"city": {"type": "string", "maxLength": 16}, "unit": {"type": "string", "enum": ["c", "f"]}}}}},
             {"type": "function", "function": {"name": "add", "parameters": {
                 "type": "object", "required": ["a", "b"], "additionalProperties": False,
                 "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}]
    for choice, names in (("required", {"get_weather", "add"}),
                          ({"type": "function", "function": {"name": "add"}}, {"add"})):
        r = chat(api, tiny.spec.name, tools=tools, tool_choice=choice, temperature=1.0, seed=2, max_tokens=200, n=3)
        assert r.status_code == 200, r.text
        for c in r.json()["choices"]:
            assert c["finish_reason"] == "tool_calls", c
            for call in c["message"]["tool_calls"]:
                assert call["type"] == "function" and call["function"]["name"] in names
                args = json.loads(call["function"]["arguments"])
                assert isinstance(args, dict)
    # a history with an assistant tool call (content null) and the tool's answer
    history = [{"role": "user", "content": "weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]
    r = api.post("/v1/chat/completions", json={"model": tiny.spec.name, "messages": history, "tools": tools,
                                               "max_tokens": 4})
    assert r.status_code == 200, r.text
    bad = chat(api, tiny.spec.name, tools=tools, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert bad.status_code == 400


def test_unknown_and_unimplemented_fields_are_refused_by_name(api, tiny):
    r = chat(api, tiny.spec.name, frobnicate=1)
    assert r.status_code == 400 and r.json()["error"] == {
        "message": r.json()["error"]["message"], "type": "invalid_request_error", "param": "frobnicate",
        "code": "unsupported_field"}
    for field, value in (("audio", {"voice": "x", "format": "wav"}), ("modalities", ["text", "audio"]),
                         ("store", True), ("reasoning_effort", "high"), ("functions", [{"name": "f"}])):
        r = chat(api, tiny.spec.name, **{field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, r.text)
    assert chat(api, tiny.spec.name, store=False, modalities=["text"], max_tokens=1).status_code == 200
    r = api.post("/v1/completions", json={"model": tiny.spec.name, "prompt": "x", "suffix": "y"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"
    r = api.post(f"/v1/tasks/{tiny.spec.name}", json={"prompt": "x", "frobnicate": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "frobnicate"


def test_models_list_and_retrieve(api, tiny):
    ps = head_prompt_set(tiny.spec, "classify", ["spam", "ham"], 2)
    assert api.put("/admin/prompt-sets/spamlike", content=ps.to_bytes(tiny.spec), headers=ADMIN).status_code == 201
    ids = {m["id"]: m for m in api.get("/v1/models").json()["data"]}
    assert tiny.spec.name in ids and ids["spamlike"]["task_type"] == "classify"
    one = api.get(f"/v1/models/{tiny.spec.name}")
    assert one.status_code == 200 and one.json()["id"] == tiny.spec.name
    missing = api.get("/v1/models/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    # a classify task answers through the OpenAI endpoints: the label as content, scores beside it
    r = chat(api, "spamlike")
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] in ("spam", "ham") and set(choice["scores"]) == {"spam", "ham"}
    assert chat(api, "spamlike", logprobs=True).status_code == 400
    batch = api.post("/v1/tasks/spamlike", json={"texts": ["a", "b b", "c c c"]}).json()
    assert [set(d["scores"]) for d in batch["data"]] == [{"spam", "ham"}] * 3
    singles = [api.post("/v1/tasks/spamlike", json={"text": t}).json()["scores"] for t in ("a", "b b", "c c c")]
    for got, want in zip(batch["data"], singles):
        assert got["scores"] == pytest.approx(want, abs=1e-5)


def test_tokenize_detokenize_and_tokenizer_files(api, tiny, tmp_path):
    r = api.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
    assert r["count"] == len(r["tokens"]) and "".join(r["token_strs"]) == "Hello world"
    assert api.post("/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == "Hello world"
    chat_ids = api.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()["tokens"]
    text = tiny.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                              tokenize=False)
    assert chat_ids == tiny.tokenizer.encode(text, add_special_tokens=False)
    assert api.post("/detokenize", json={"tokens": [10 ** 9]}).status_code == 400
    assert api.post("/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404
    listing = api.get("/v1/tokenizer").json()["files"]
    for f in listing:
        (tmp_path / f["name"]).write_bytes(api.get(f["url"]).content)
    from transformers import AutoTokenizer
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.encode("Hello world") == tiny.tokenizer.encode("Hello world")
    assert api.get("/v1/tokenizer/../../etc/passwd").status_code == 404


def test_strict_json_schema_closes_objects_that_do_not_say(api, tiny):
    """OpenAI's strict mode admits no keys beyond the properties; JSON Schema's default would admit any."""
    open_schema = {"type": "object", "required": ["a"], "properties": {"a": {"type": "integer", "maximum": 9,
                                                                               "minimum": 0}}}
    r = chat(api, tiny.spec.name, n=6, temperature=1.0, seed=7, max_tokens=60,
             response_format={"type": "json_schema",
                              "json_schema": {"name": "x", "schema": open_schema, "strict": True}})
    for choice in r.json()["choices"]:
        assert choice["finish_reason"] == "stop" and set(json.loads(choice["message"]["content"])) == {"a"}


# A representative, valid value for each field of OpenAI's request schemas (the openai SDK's own lists).
FIELD_SAMPLES = {
    "audio": {"voice": "alloy", "format": "wav"}, "frequency_penalty": 0.5, "function_call": "auto",
    "functions": [{"name": "f", "parameters": {"type": "object"}}], "logit_bias": {"5": 1.0}, "logprobs": True,
    "max_completion_tokens": 2, "max_tokens": 2, "metadata": {"k": "v"}, "modalities": ["text", "audio"],
    "moderation": True, "n": 2, "parallel_tool_calls": False, "prediction": {"type": "content", "content": "x"},
    "presence_penalty": 0.5, "prompt_cache_key": "k", "prompt_cache_options": {"mode": "auto"},
    "prompt_cache_retention": "24h", "reasoning_effort": "low", "response_format": {"type": "json_object"},
    "safety_identifier": "user-1", "seed": 3, "service_tier": "flex", "stop": ["zz"], "store": True,
    "stream_options": {"include_usage": True}, "temperature": 0.5, "tool_choice": "none",
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "top_logprobs": 2, "top_p": 0.9, "user": "user-1", "verbosity": "low",
    "web_search_options": {"search_context_size": "low"}, "best_of": 2, "echo": True, "suffix": " end",
}


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_every_openai_request_field_is_served_or_refused_by_name(api, tiny, endpoint):
    """Walks the openai SDK's list of request fields: each is either implemented (200) or refused with a 400
    whose `param` names it. Nothing is accepted and ignored."""
    from openai.types import completion_create_params
    from openai.types.chat import completion_create_params as chat_params

    from app.api.openai_schemas import ChatCompletionRequest, CompletionRequest

    params, model, path = ((chat_params, ChatCompletionRequest, "/v1/chat/completions") if endpoint == "chat"
                           else (completion_create_params, CompletionRequest, "/v1/completions"))
    base = ({"messages": [{"role": "user", "content": "hi"}]} if endpoint == "chat" else {"prompt": "hi"})
    base.update(model=tiny.spec.name, max_tokens=2)
    fields = set(params.CompletionCreateParamsBase.__annotations__) - {"model", "messages", "prompt"}
    served, refused = [], []
    for field in sorted(fields):
        assert field in FIELD_SAMPLES, f"the SDK has a field this test has no sample for: {field}"
        body = {**base, field: FIELD_SAMPLES[field]}
        if field == "top_logprobs":
            body["logprobs"] = True
        if field == "stream_options":
            body["stream"] = True
        if field == "best_of":
            body["n"] = 2
        r = api.post(path, json=body)
        implemented = field in model.model_fields and field not in model.UNSUPPORTED
        if r.status_code == 200:
            assert implemented, f"{field}: answered 200 but this server does not implement it"
            served.append(field)
        else:
            assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, r.status_code, r.text[:300])
            refused.append(field)
    assert served and (refused or endpoint == "completions")
    # with best_of != n, refused by name too
    if endpoint == "completions":
        r = api.post(path, json={**base, "best_of": 3})
        assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"
