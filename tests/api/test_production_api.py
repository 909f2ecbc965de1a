"""Status-code paths, admin operations, metrics and request ids, on the real app."""

import io
import json
import time
import zipfile

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from peft import PromptTuningConfig, TaskType, get_peft_model

from app.api.main import create_app
from tests.api.conftest import ADMIN, make_settings
from tests.helpers import input_prompt_set


def _up(client, name, spec, seed=0, p=3):
    r = client.put(f"/admin/prompt-sets/{name}", content=input_prompt_set(spec, p, seed=seed).to_bytes(spec),
                   headers=ADMIN)
    assert r.status_code == 201, r.text
    return r.json()


def test_admin_lists_activates_and_deletes(client, tiny):
    for seed in range(3):
        _up(client, "chat", tiny.spec, seed)
    listing = client.get("/admin/prompt-sets", headers=ADMIN).json()
    assert listing[0]["name"] == "chat" and listing[0]["active_version"] == 3
    v = listing[0]["versions"][0]
    assert {"kind", "task_type", "num_virtual_tokens", "labels", "size", "sha256", "created"} <= set(v)
    assert client.post("/admin/prompt-sets/chat/versions/1/activate", headers=ADMIN).json()["active"]
    assert client.post("/v1/tasks/chat", json={"prompt": "x", "max_tokens": 1}).json()["prompt_set"]["version"] == 1
    # the active version cannot be deleted (the task would be left without one): 409
    r = client.delete("/admin/prompt-sets/chat/versions/1", headers=ADMIN)
    assert r.status_code == 409 and "active" in r.json()["error"]["message"]
    assert client.delete("/admin/prompt-sets/chat/versions/2", headers=ADMIN).status_code == 204
    assert client.delete("/admin/prompt-sets/chat/versions/2", headers=ADMIN).status_code == 404
    assert client.post("/admin/prompt-sets/chat/versions/9/activate", headers=ADMIN).status_code == 404
    assert [x["version"] for x in client.get("/admin/prompt-sets/chat", headers=ADMIN).json()["versions"]] == [1, 3]
    assert client.delete("/admin/prompt-sets/chat", headers=ADMIN).status_code == 204
    assert client.post("/v1/tasks/chat", json={"prompt": "x"}).status_code == 404
    assert client.delete("/admin/prompt-sets/chat", headers=ADMIN).status_code == 404
    assert client.get("/admin/prompt-sets/chat", headers=ADMIN).status_code == 404


def test_upload_of_a_zipped_peft_adapter(client, tiny, tmp_path):
    torch.manual_seed(0)
    get_peft_model(tiny.model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)) \
        .save_pretrained(tmp_path / "adapter")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in (tmp_path / "adapter").iterdir():
            z.write(f, f"adapter/{f.name}")
    r = client.put("/admin/prompt-sets/peft", content=buf.getvalue(),
                   headers={**ADMIN, "Content-Type": "application/zip"})
    assert r.status_code == 201, r.text
    assert r.json()["kind"] == "input" and r.json()["num_virtual_tokens"] == 4
    bad = client.put("/admin/prompt-sets/peft", content=b"PK\x05\x06" + b"\0" * 18,
                     headers={**ADMIN, "Content-Type": "application/zip"})
    assert bad.status_code == 422


def test_unsupported_media_type_is_415(client, tiny):
    r = client.put("/admin/prompt-sets/x", content=b"{}", headers={**ADMIN, "Content-Type": "application/json"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"


def test_one_error_body_everywhere(client):
    for r in (client.post("/v1/tasks/nope", json={"prompt": "x"}), client.post("/v1/tasks/nope", content=b"{"),
              client.get("/no/such/route")):
        err = r.json()["error"]
        # OpenAI's error object, on every route
        assert set(err) == {"type", "message", "param", "code"} and isinstance(err["message"], str)
        assert err["type"] == ("not_found_error" if r.status_code == 404 else "invalid_request_error")


def test_api_keys_guard_v1_only(tiny, tmp_path):
    with TestClient(create_app(make_settings(tmp_path, api_keys="k1,k2", warmup=False), loaded=tiny)) as c:
        name = tiny.spec.name
        assert c.post(f"/v1/tasks/{name}", json={"prompt": "x", "max_tokens": 1}).status_code == 401
        bad = c.post(f"/v1/tasks/{name}", json={"prompt": "x"}, headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401
        ok = c.post(f"/v1/tasks/{name}", json={"prompt": "x", "max_tokens": 1}, headers={"Authorization": "Bearer k2"})
        assert ok.status_code == 200
        assert c.get("/v1/models").status_code == 401
        assert c.get("/health").status_code == 200
        # /metrics names every task: with keys on it needs one, unless the operator opens it
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"Authorization": "Bearer k1"}).status_code == 200
    with TestClient(create_app(make_settings(tmp_path, api_keys="k1", metrics_need_key=False, warmup=False),
                               loaded=tiny)) as c:
        assert c.get("/metrics").status_code == 200


def test_full_queue_answers_503_with_retry_after(tiny, tmp_path):
    with TestClient(create_app(make_settings(tmp_path, max_queue=0, warmup=False), loaded=tiny)) as c:
        r = c.post(f"/v1/tasks/{tiny.spec.name}", json={"prompt": "x", "max_tokens": 5})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        r = c.post(f"/v1/tasks/{tiny.spec.name}", json={"prompt": "x", "max_tokens": 5, "stream": True})
        assert r.status_code == 503


def test_request_timeout_is_504_and_frees_the_row(tiny, tmp_path):
    settings = make_settings(tmp_path, request_timeout=0.05, max_model_len=1024, warmup=False)
    with TestClient(create_app(settings, loaded=tiny)) as c:
        r = c.post(f"/v1/tasks/{tiny.spec.name}", json={"prompt": "x", "max_tokens": 1000, "ignore_eos": True})
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        engine = c.app.state.engine
        deadline = time.time() + 5
        while engine.num_running and time.time() < deadline:
            time.sleep(0.01)
        assert engine.num_running == 0


def test_metrics_and_request_ids(client, tiny):
    r = client.post(f"/v1/tasks/{tiny.spec.name}", json={"prompt": "x", "max_tokens": 3, "ignore_eos": True},
                    headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert len(client.get("/health").headers["x-request-id"]) == 32
    _up(client, "t", tiny.spec)
    client.post("/v1/tasks/t", json={"prompt": "x", "max_tokens": 2})
    text = client.get("/metrics").text
    name = tiny.spec.name
    for line in [f'promptserve_requests_total{{status="200",task="{name}"}}',
                 f'promptserve_tokens_total{{kind="completion",task="{name}"}} 3.0',
                 f'promptserve_time_to_first_token_seconds_count{{task="{name}"}}',
                 f'promptserve_request_latency_seconds_bucket{{le="+Inf",task="{name}"}}',
                 'promptserve_prompt_set_uploads_total{task="t"} 1.0', "promptserve_queue_depth",
                 "promptserve_running_batch_size", "promptserve_prompt_set_cache_misses_total 1.0",
                 "promptserve_prompt_sets_resident 1.0", "promptserve_engine_threads ",
                 "promptserve_prompt_cache_prompt_tokens_total ", "promptserve_prompt_cache_hit_tokens_total ",
                 "promptserve_prompt_cache_bytes "]:
        assert line in text, line


def test_task_listing_and_models(client, tiny):
    _up(client, "chat", tiny.spec)
    tasks = client.get("/v1/tasks").json()["data"]
    assert {t["name"] for t in tasks} == {tiny.spec.name, "chat"}
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and {m["id"] for m in models["data"]} == {tiny.spec.name, "chat"}


def test_openai_shapes_and_errors(client, tiny):
    name = tiny.spec.name
    r = client.post("/v1/completions", json={"model": name, "prompt": "hello", "max_tokens": 4, "temperature": 0,
                                             "ignore_eos": True, "top_k": 5, "seed": 1, "stop": ["zzz"]})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion"
    assert body["usage"]["completion_tokens"] == 4 and body["choices"][0]["finish_reason"] == "length"
    r = client.post("/v1/chat/completions", json={"model": name, "messages": [{"role": "user", "content": "hi"}],
                                                  "max_tokens": 3, "temperature": 0})
    assert r.json()["choices"][0]["message"]["role"] == "assistant"
    assert client.post("/v1/chat/completions", json={"model": "nope", "messages": [
        {"role": "user", "content": "hi"}]}).status_code == 404
    assert client.post("/v1/completions", json={"model": name, "prompt": "a", "n": 17}).status_code == 400
    r = client.post("/v1/completions", json={"model": name, "prompt": "a", "max_tokens": 100_000})
    assert r.status_code == 400


def test_disconnected_stream_leaves_the_batch(live_server, tiny):
    base, app = live_server
    engine = app.state.engine
    body = {"prompt": "Once", "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{base}/v1/tasks/{tiny.spec.name}", json=body, timeout=30) as r:
        assert r.status_code == 200
        for i, _ in enumerate(r.iter_lines()):
            if i >= 3:
                break
        assert engine.num_running == 1
    # the client is gone: its sequence leaves the batch at the next steps, long before 900 tokens
    deadline = time.time() + 5
    while engine.num_running and time.time() < deadline:
        time.sleep(0.01)
    assert engine.num_running == 0
    assert engine.steps < 900


def test_stream_events_are_json(live_server, tiny):
    base, _ = live_server
    with httpx.stream("POST", f"{base}/v1/chat/completions", timeout=30, json={
            "model": tiny.spec.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize("path", ["/v1/tasks/x", "/admin/prompt-sets/x"])
def test_bodies_that_are_not_json_or_wrong_types_are_400(client, path):
    if path.startswith("/v1"):
        assert client.post(path, content=b"[1,2]", headers={"content-type": "application/json"}).status_code == 400
    else:
        assert client.put(path, headers=ADMIN).status_code == 400


def test_docs_pages_load_nothing_from_another_host(client):
    import re

    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        page = client.get(path)
        assert page.status_code == 200, path
        external = re.findall(r"""(?:src|href|url)\s*[=(:]\s*["']?(?:https?:)?//[^"'\s>)]+""", page.text)
        assert not external, (path, external)
        for asset in re.findall(r"""(?:src|href)=["'](/[^"']+)["']""", page.text):
            assert client.get(asset).status_code == 200, asset
