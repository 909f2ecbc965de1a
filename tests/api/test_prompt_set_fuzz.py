"""Structure-aware fuzz of prompt-set uploads: valid safetensors files with hostile shapes, dtypes and
metadata, each a small mutation of a valid set. Every upload is answered 201/200 or 422 (never 5xx), and
whatever is accepted serves, while a neighbour's output stays exactly its solo output."""

import json
import threading

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from app.api.main import create_app
from tests.api.conftest import ADMIN, make_settings
from tests.helpers import input_prompt_set, random_deep_prompt_set

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8, torch.int64, torch.bool]


@pytest.fixture(scope="module")
def fuzz_client(tiny, tmp_path_factory):
    with TestClient(create_app(make_settings(tmp_path_factory.mktemp("fuzz")), loaded=tiny)) as c:
        neighbour = {"prompt": "The neighbour", "max_tokens": 8, "ignore_eos": True}
        solo = c.post(f"/v1/tasks/{tiny.spec.name}", json=neighbour).json()["text"]
        yield c, neighbour, solo


@st.composite
def prompt_set_files(draw, spec):
    kind = draw(st.sampled_from(["input", "deep"]))
    p = draw(st.integers(1, 6))
    base = (input_prompt_set(spec, p, seed=draw(st.integers(0, 9))) if kind == "input"
            else random_deep_prompt_set(spec, p, seed=draw(st.integers(0, 9)), scale=0.5))
    tensors = dict(base.tensors)
    meta = base.meta.to_header(spec)
    mutation = draw(st.sampled_from(["none", "shape", "dtype", "values", "extra_tensor", "drop_tensor",
                                     "meta_value", "meta_drop", "head"]))
    name = draw(st.sampled_from(sorted(tensors)))
    if mutation == "shape":
        dims = draw(st.lists(st.integers(0, 8), min_size=0, max_size=5))
        tensors[name] = torch.zeros(dims)
    elif mutation == "dtype":
        tensors[name] = tensors[name].to(draw(st.sampled_from(DTYPES)))
    elif mutation == "values":
        value = draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e30, 65504.0, -1e5, 0.0]))
        t = tensors[name].clone()
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = value
        tensors[name] = t
    elif mutation == "extra_tensor":
        tensors[draw(st.sampled_from(["junk", "head.weight", "head.bias", "keys", "embeddings"]))] = torch.zeros(
            draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    elif mutation == "drop_tensor":
        tensors.pop(name)
    elif mutation == "meta_value":
        key = draw(st.sampled_from(sorted(meta)))
        meta[key] = draw(st.one_of(
            st.sampled_from(["", "0", "-1", "1e3", "99999999999999999999", "[]", "{}", '"abc"', "null", "[1]",
                             '["a","a"]', '["x","y"]', "input", "deep", "classify", "extract", "[" * 2000]),
            st.text(max_size=20)))
    elif mutation == "meta_drop":
        meta.pop(draw(st.sampled_from(sorted(meta))))
    elif mutation == "head":
        meta["task_type"] = draw(st.sampled_from(["classify", "extract"]))
        meta["labels"] = json.dumps(draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=0, max_size=3,
                                                  unique=True)))
        rows = draw(st.integers(0, 8))
        tensors["head.weight"] = torch.randn(rows, draw(st.sampled_from([spec.hidden_size, 3])))
    if not tensors:
        tensors["junk"] = torch.zeros(1)
    return st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_hostile_prompt_sets_are_refused_or_served_and_never_disturb_a_neighbour(fuzz_client, tiny, data):
    client, neighbour, solo = fuzz_client
    file = data.draw(prompt_set_files(tiny.spec))
    r = client.put("/admin/prompt-sets/fuzzed", content=file, headers=ADMIN)
    assert r.status_code in (200, 201, 422), (r.status_code, r.text[:300])
    if r.status_code == 422:
        return
    results = {}

    def run(key, url, body):
        results[key] = client.post(url, json=body)

    task_type = r.json()["task_type"]
    body = {"prompt": "Hi", "max_tokens": 4} if task_type == "generate" else {"text": "Hi there"}
    threads = [threading.Thread(target=run, args=("fuzzed", "/v1/tasks/fuzzed", body)),
               threading.Thread(target=run, args=("neighbour", f"/v1/tasks/{tiny.spec.name}", neighbour))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert results["fuzzed"].status_code == 200, results["fuzzed"].text[:300]
    assert results["neighbour"].status_code == 200 and results["neighbour"].json()["text"] == solo
