import pytest
import torch

from prompt_store.format import PromptSet, PromptSetMeta
from tests.api.conftest import ADMIN
from tests.helpers import input_prompt_set


def _store_files(tmp_path):
    root = tmp_path / "store"
    return sorted((p.relative_to(root), p.read_bytes()) for p in root.rglob("*") if p.is_file())


def test_admin_needs_the_token(client, tiny):
    data = input_prompt_set(tiny.spec, 3).to_bytes(tiny.spec)
    assert client.put("/admin/prompt-sets/x", content=data).status_code == 401
    assert client.put("/admin/prompt-sets/x", content=data, headers={"Authorization": "Bearer no"}).status_code == 403


def test_admin_disabled_without_token(tiny, tmp_path):
    from fastapi.testclient import TestClient

    from app.api.main import create_app
    from tests.api.conftest import make_settings

    with TestClient(create_app(make_settings(tmp_path, admin_token="", warmup=False), loaded=tiny)) as c:
        r = c.put("/admin/prompt-sets/x", content=b"abc", headers=ADMIN)
        assert r.status_code == 403 and "disabled" in r.json()["error"]["message"]


def _bad_files(spec):
    good = input_prompt_set(spec, 3).to_bytes(spec)
    nan = input_prompt_set(spec, 3)
    nan.tensors["embeddings"][0, 0] = float("nan")
    wrong_model = PromptSet(PromptSetMeta(kind="input", num_virtual_tokens=3, base_model="feedfacefeedface"),
                            {"embeddings": torch.zeros(3, spec.hidden_size)})
    wrong_shape = PromptSet(PromptSetMeta(kind="deep", num_virtual_tokens=3, base_model=spec.fingerprint),
                            {"keys": torch.zeros(spec.num_layers, spec.num_kv_heads + 1, 3, spec.head_dim),
                             "values": torch.zeros(spec.num_layers, spec.num_kv_heads + 1, 3, spec.head_dim)})
    return {
        "not_safetensors": (b"PK\x03\x04 this is a zip, not safetensors", 422),
        "truncated": (good[:-7], 422),
        "nan": (nan.to_bytes(spec), 422),
        "wrong_model": (wrong_model.to_bytes(spec), 422),
        "wrong_shape": (wrong_shape.to_bytes(spec), 422),
        "empty": (b"", 400),
    }


@pytest.mark.parametrize("case", ["not_safetensors", "truncated", "nan", "wrong_model", "wrong_shape", "empty"])
def test_bad_prompt_sets_are_refused_and_store_unchanged(client, tiny, tmp_path, case):
    ok = client.put("/admin/prompt-sets/spam", content=input_prompt_set(tiny.spec, 3).to_bytes(tiny.spec),
                    headers=ADMIN)
    assert ok.status_code == 201
    before = _store_files(tmp_path)
    data, status = _bad_files(tiny.spec)[case]
    for task in ("spam", "fresh"):
        r = client.put(f"/admin/prompt-sets/{task}", content=data, headers=ADMIN)
        assert r.status_code == status, r.text
        assert r.json()["error"]["message"]
    assert _store_files(tmp_path) == before
    assert client.post("/v1/tasks/spam", json={"prompt": "hi", "max_tokens": 2}).json()["prompt_set"]["version"] == 1


def test_upload_size_cap_and_reserved_names(tiny, tmp_path):
    from fastapi.testclient import TestClient

    from app.api.main import create_app
    from tests.api.conftest import make_settings

    with TestClient(create_app(make_settings(tmp_path, max_upload_bytes=1000, warmup=False), loaded=tiny)) as c:
        big = input_prompt_set(tiny.spec, 20).to_bytes(tiny.spec)
        assert c.put("/admin/prompt-sets/x", content=big, headers=ADMIN).status_code == 413
        small = input_prompt_set(tiny.spec, 1).to_bytes(tiny.spec)
        assert c.put(f"/admin/prompt-sets/{tiny.spec.name}", content=small, headers=ADMIN).status_code == 409
        assert c.put("/admin/prompt-sets/..bad", content=small, headers=ADMIN).status_code in (400, 404)


def test_an_uploaded_or_activated_version_is_resident_when_the_answer_comes(client, tiny):
    engine = client.app.state.engine
    hashes = []
    for seed in (1, 2):
        r = client.put("/admin/prompt-sets/warm", content=input_prompt_set(tiny.spec, 3, seed=seed).to_bytes(tiny.spec),
                       headers=ADMIN)
        hashes.append(r.json()["sha256"])
        assert r.status_code == 201 and r.json()["sha256"] in engine.runner.prefixes
    engine.runner.prefixes._entries.clear()  # as if evicted
    assert client.post("/admin/prompt-sets/warm/versions/1/activate", headers=ADMIN).status_code == 200
    assert hashes[0] in engine.runner.prefixes
    misses = engine.runner.prefixes.misses
    r = client.post("/v1/tasks/warm", json={"prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["prompt_set"]["version"] == 1
    assert engine.runner.prefixes.misses == misses  # the request found it loaded
