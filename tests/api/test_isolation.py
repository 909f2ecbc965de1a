"""Isolation and identity through the API (issue: a request never runs a deleted or another version's
prompt set, and never fails for its neighbour). Each test is a case that once failed."""

import io
import json
import struct
import threading
import zipfile

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save as st_save

from app.api.main import create_app
from tests.api.conftest import ADMIN, make_settings
from tests.helpers import input_prompt_set


def _put(client, name, data, **headers):
    return client.put(f"/admin/prompt-sets/{name}", content=data, headers={**ADMIN, **headers})


def _greedy(client, task, prompt="Tell me a story", n=8):
    r = client.post(f"/v1/tasks/{task}", json={"prompt": prompt, "max_tokens": n, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_deleted_and_recreated_task_serves_the_new_bytes(client, tiny):
    a = input_prompt_set(tiny.spec, 8, seed=1, scale=1.0).to_bytes(tiny.spec)
    b = input_prompt_set(tiny.spec, 2, seed=2, scale=1.0).to_bytes(tiny.spec)  # fewer virtual tokens than a
    assert _put(client, "t", a).json()["version"] == 1
    out_a = _greedy(client, "t")
    assert client.delete("/admin/prompt-sets/t", headers=ADMIN).status_code == 204
    up = _put(client, "t", b).json()
    assert up["version"] == 2  # never v1 again
    _put(client, "reference", b)
    out_b = _greedy(client, "t")
    assert out_b["text"] == _greedy(client, "reference")["text"] != out_a["text"]
    assert out_b["prompt_set"] == {"name": "t", "version": 2}
    # a long prompt fits the new, shorter prefix exactly: no overflow of the cache row
    long_prompt = "hello " * 240
    r = client.post("/v1/tasks/t", json={"prompt": long_prompt, "max_tokens": 1})
    assert r.status_code in (200, 400), r.text


def test_deleting_the_highest_version_then_uploading_never_reuses_its_number(client, tiny):
    for seed in (1, 2):
        _put(client, "t", input_prompt_set(tiny.spec, 3, seed=seed).to_bytes(tiny.spec))
    assert client.post("/admin/prompt-sets/t/versions/1/activate", headers=ADMIN).status_code == 200
    assert client.delete("/admin/prompt-sets/t/versions/2", headers=ADMIN).status_code == 204
    new = input_prompt_set(tiny.spec, 3, seed=3).to_bytes(tiny.spec)
    assert _put(client, "t", new).json()["version"] == 3
    _put(client, "reference", new)
    assert _greedy(client, "t")["text"] == _greedy(client, "reference")["text"]


def test_a_replica_on_the_same_store_serves_the_active_bytes(tiny, tmp_path):
    settings = make_settings(tmp_path)
    with TestClient(create_app(settings, loaded=tiny)) as one, TestClient(create_app(settings, loaded=tiny)) as two:
        _put(one, "t", input_prompt_set(tiny.spec, 4, seed=1, scale=1.0).to_bytes(tiny.spec))
        _greedy(two, "t")  # the replica loads and caches v1
        one.delete("/admin/prompt-sets/t", headers=ADMIN)
        new = input_prompt_set(tiny.spec, 4, seed=2, scale=1.0).to_bytes(tiny.spec)
        _put(one, "t", new)
        _put(one, "reference", new)
        assert _greedy(two, "t")["text"] == _greedy(one, "reference")["text"]


def test_idempotent_uploads_answer_200_with_the_stored_version(client, tiny):
    data = input_prompt_set(tiny.spec, 3, seed=5).to_bytes(tiny.spec)
    first = _put(client, "t", data, **{"Idempotency-Key": "abc"})
    again = _put(client, "t", data, **{"Idempotency-Key": "abc"})
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["version"] == first.json()["version"] == 1
    assert _put(client, "t", data).status_code == 200  # same bytes in a row, no key
    other = input_prompt_set(tiny.spec, 3, seed=6).to_bytes(tiny.spec)
    r = _put(client, "t", other, **{"Idempotency-Key": "abc"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "idempotency_key_reused"


def test_concurrent_uploads_leave_the_last_answered_version_active(client, tiny):
    datas = [input_prompt_set(tiny.spec, 3, seed=100 + i).to_bytes(tiny.spec) for i in range(8)]
    answers = []
    lock = threading.Lock()

    def upload(d):
        r = _put(client, "t", d)
        with lock:  # the order in which the answers arrived
            answers.append(r.json())

    threads = [threading.Thread(target=upload, args=(d,)) for d in datas]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert all(a["active"] for a in answers)
    active = client.get("/admin/prompt-sets/t", headers=ADMIN).json()["active_version"]
    assert active == max(a["version"] for a in answers)


def test_an_unservable_prompt_set_is_refused_at_upload(client, tiny):
    # the test server's context is 256 tokens
    r = _put(client, "t", input_prompt_set(tiny.spec, 250).to_bytes(tiny.spec))
    assert r.status_code == 422 and "context" in r.json()["error"]["message"]
    assert client.get("/admin/prompt-sets/t", headers=ADMIN).status_code == 404


def _safetensors(tensors: dict, metadata: dict) -> bytes:
    return st_save(tensors, metadata=metadata)


def _zip(files: dict[str, bytes], corrupt: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    data = bytearray(buf.getvalue())
    if corrupt:  # flip a byte inside the first entry's data: its CRC no longer matches
        offset = 30 + len(next(iter(files)))
        data[offset] ^= 0xFF
    return bytes(data)


def _hostile_files(spec):
    good_meta = input_prompt_set(spec, 3).meta.to_header(spec)
    emb = torch.zeros(3, spec.hidden_size)
    peft_weights = st_save({"prompt_embeddings": torch.zeros(4, spec.hidden_size)})
    config = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4, "task_type": "CAUSAL_LM"}
    nested = "[" * 100_000 + "]" * 100_000
    header = json.dumps({"__metadata__": {"format": "x"}, "a": json.loads("[" * 50 + "]" * 50)}).encode()
    return {
        "nested-labels": ("octet", _safetensors({"embeddings": emb}, {**good_meta, "labels": nested})),
        "nested-extra": ("octet", _safetensors({"embeddings": emb}, {**good_meta, "extra": nested})),
        "nested-header": ("octet", struct.pack("<Q", len(header)) + header),
        "labels-string": ("octet", _safetensors({"embeddings": emb}, {**good_meta, "labels": '"abc"'})),
        "0-D": ("octet", _safetensors({"embeddings": torch.tensor(1.0)}, good_meta)),
        "1-D": ("octet", _safetensors({"embeddings": torch.zeros(spec.hidden_size)}, good_meta)),
        "int-dtype": ("octet", _safetensors({"embeddings": torch.zeros(3, spec.hidden_size, dtype=torch.int32)},
                                            good_meta)),
        "huge-values": ("octet", _safetensors({"embeddings": torch.full((3, spec.hidden_size), 1e30)}, good_meta)),
        "too-many-tokens": ("octet", _safetensors({"embeddings": torch.zeros(4096, spec.hidden_size)},
                                                  {**good_meta, "num_virtual_tokens": "4096"})),
        "zip-config-list": ("zip", _zip({"a/adapter_config.json": b"[]", "a/adapter_model.safetensors": peft_weights})),
        "zip-config-bad-p": ("zip", _zip({"a/adapter_config.json": json.dumps({**config, "num_virtual_tokens": "x"})
                                          .encode(), "a/adapter_model.safetensors": peft_weights})),
        "zip-garbage-weights": ("zip", _zip({"a/adapter_config.json": json.dumps(config).encode(),
                                             "a/adapter_model.safetensors": b"garbage" * 10})),
        "zip-0-D-weights": ("zip", _zip({"a/adapter_config.json": json.dumps(config).encode(),
                                         "a/adapter_model.safetensors":
                                             st_save({"prompt_embeddings": torch.tensor(1.)})})),
        "zip-1-D-weights": ("zip", _zip({"a/adapter_config.json": json.dumps(config).encode(),
                                         "a/adapter_model.safetensors": st_save(
                                             {"prompt_embeddings": torch.zeros(spec.hidden_size)})})),
        "zip-bad-crc": ("zip", _zip({"a/adapter_config.json": json.dumps(config).encode(),
                                     "a/adapter_model.safetensors": peft_weights}, corrupt=True)),
        "zip-not-json": ("zip", _zip({"a/adapter_config.json": b"{", "a/adapter_model.safetensors": peft_weights})),
    }


def test_hostile_prompt_set_files_are_refused_with_422_and_change_nothing(client, tiny):
    for name, (kind, data) in _hostile_files(tiny.spec).items():
        media = "application/zip" if kind == "zip" else "application/octet-stream"
        r = _put(client, "t", data, **{"Content-Type": media})
        assert r.status_code == 422, (name, r.status_code, r.text[:300])
        assert r.json()["error"]["code"] == "invalid_prompt_set", name
    assert client.get("/admin/prompt-sets/t", headers=ADMIN).status_code == 404


@pytest.mark.parametrize("version", ["1" * 300, "0", "-1"])
def test_absurd_version_numbers_are_404(client, tiny, version):
    _put(client, "t", input_prompt_set(tiny.spec, 3).to_bytes(tiny.spec))
    for method, path in (("post", f"/admin/prompt-sets/t/versions/{version}/activate"),
                         ("delete", f"/admin/prompt-sets/t/versions/{version}")):
        r = getattr(client, method)(path, headers=ADMIN)
        assert r.status_code in (404, 422) and "error" in r.json(), (path, r.status_code, r.text)


def test_an_unexpected_exception_is_the_one_json_500(tiny, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("a bug")
    with TestClient(create_app(make_settings(tmp_path), loaded=tiny), raise_server_exceptions=False) as c:
        monkeypatch.setattr(c.app.state.tasks, "list_tasks", boom)
        r = c.get("/v1/tasks")
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    assert r.headers["x-request-id"] in r.json()["error"]["message"]


def test_tiny_temperatures_do_not_fail_the_neighbours(client, tiny):
    """temperature 1e-40 made the logits infinite and failed every request of its step."""
    results = {}

    def run(key, body):
        results[key] = client.post(f"/v1/tasks/{tiny.spec.name}", json=body)

    threads = [threading.Thread(target=run, args=(i, {"prompt": "Hello", "max_tokens": 8, "ignore_eos": True,
                                                       "temperature": t}))
               for i, t in enumerate([1e-40, 5e-324, 0.0, 0.7, 1e-40, 1.0])]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert {k: r.status_code for k, r in results.items()} == {i: 200 for i in range(6)}
    # below 1e-5 it is greedy: the same answer as temperature 0
    assert results[0].json()["text"] == results[2].json()["text"] == results[4].json()["text"]
