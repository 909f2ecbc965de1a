import json

from tests.api.conftest import ADMIN
from tests.helpers import input_prompt_set, random_deep_prompt_set


def upload(client, name, ps, spec):
    return client.put(f"/admin/prompt-sets/{name}", content=ps.to_bytes(spec), headers=ADMIN)


def test_health_and_ready(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 200


def test_base_model_id_serves_without_prompt_set(client, tiny):
    r = client.post(f"/v1/tasks/{tiny.spec.name}", json={"prompt": "Hello", "max_tokens": 5, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["prompt_set"] == {"name": tiny.spec.name, "version": None}
    assert body["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 5
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 5


def test_upload_then_generate_with_messages_and_hot_swap(client, tiny):
    r = upload(client, "chat", input_prompt_set(tiny.spec, 4, seed=1, scale=0.5), tiny.spec)
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 1 and r.json()["kind"] == "input" and r.json()["active"]
    req = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "ignore_eos": True}
    first = client.post("/v1/tasks/chat", json=req).json()
    assert first["prompt_set"] == {"name": "chat", "version": 1}
    assert upload(client, "chat", random_deep_prompt_set(tiny.spec, 7, seed=2), tiny.spec).json()["version"] == 2
    second = client.post("/v1/tasks/chat", json=req).json()  # the very next request uses the new version
    assert second["prompt_set"] == {"name": "chat", "version": 2}
    assert second["text"] != first["text"]


def test_streaming_sends_tokens_as_server_sent_events(client, tiny):
    req = {"prompt": "Once upon a time", "max_tokens": 8, "ignore_eos": True, "stream": True}
    with client.stream("POST", f"/v1/tasks/{tiny.spec.name}", json=req) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 8
    streamed = "".join(c["text"] for c in chunks)
    plain = client.post(f"/v1/tasks/{tiny.spec.name}", json={**req, "stream": False}).json()
    assert streamed == plain["text"]


def test_stop_strings_and_seeded_sampling(client, tiny):
    base = f"/v1/tasks/{tiny.spec.name}"
    plain = client.post(base, json={"prompt": "abc", "max_tokens": 20, "ignore_eos": True}).json()["text"]
    assert len(plain) > 4
    stop = plain[2:4]
    cut = client.post(base, json={"prompt": "abc", "max_tokens": 20, "ignore_eos": True, "stop": [stop]}).json()
    assert cut["finish_reason"] == "stop" and cut["text"] == plain[:plain.index(stop)]
    sampled = [client.post(base, json={"prompt": "abc", "max_tokens": 10, "temperature": 1.0, "top_p": 0.9,
                                       "top_k": 50, "seed": 7, "ignore_eos": True}).json()["text"] for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_request_errors(client, tiny):
    assert client.post("/v1/tasks/nope", json={"prompt": "x"}).status_code == 404
    body = client.post(f"/v1/tasks/{tiny.spec.name}",
                       json={"prompt": "x", "messages": [{"role": "user", "content": "y"}]})
    assert body.status_code == 400 and body.json()["error"]["code"] == "invalid_request"
    too_long = client.post(f"/v1/tasks/{tiny.spec.name}", json={"prompt": "hello", "max_tokens": 10_000})
    assert too_long.status_code == 400 and "exceeds the context" in too_long.json()["error"]["message"]
    assert too_long.json()["error"]["code"] == "context_length_exceeded"
    assert client.post(f"/v1/tasks/{tiny.spec.name}", json={"prompt": "x", "temperature": -1}).status_code == 400
