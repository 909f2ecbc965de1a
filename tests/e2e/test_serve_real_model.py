"""`promptserve serve` as a real process on the embedded SmolLM2: ready, then answers a chat request."""

import os

import httpx
import pytest

from tests.helpers import input_prompt_set
from tests.servers import free_port, spawn, stop, wait_ready

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.real_model


@pytest.fixture
def server(tmp_path):
    port = free_port()
    # no PROMPTSERVE_SEED_DIR: the demo tasks come from the package's own data, as for a pip-installed server
    env = {"PROMPTSERVE_STORE_DIR": str(tmp_path / "store"), "PROMPTSERVE_ADMIN_TOKEN": "tok",
           "PROMPTSERVE_MAX_NUM_SEQS": "8"}
    proc = spawn({**env}, port, quiet=False)
    assert "PROMPTSERVE_SEED_DIR" not in os.environ
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, proc)
    yield base
    stop(proc)


def test_serves_chat_and_an_uploaded_prompt_set(server, smol):
    r = httpx.post(f"{server}/v1/tasks/{smol.spec.name}", timeout=60,
                   json={"messages": [{"role": "user", "content": "What is the capital of France?"}],
                         "max_tokens": 24, "temperature": 0})
    assert r.status_code == 200, r.text
    assert "Paris" in r.json()["text"]
    assert r.json()["finish_reason"] == "stop"
    # the same weights in the server (bf16 on this CPU) and in the test (fp32) share one fingerprint
    ps = input_prompt_set(smol.spec, 4, scale=0.01)
    up = httpx.put(f"{server}/admin/prompt-sets/demo", content=ps.to_bytes(smol.spec),
                   headers={"Authorization": "Bearer tok"}, timeout=30)
    assert up.status_code == 201, up.text
    r = httpx.post(f"{server}/v1/tasks/demo", json={"prompt": "Hello", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200 and r.json()["prompt_set"] == {"name": "demo", "version": 1}


def test_demo_tasks_and_the_openai_client(server):
    """The shipped demo prompt sets serve as tasks chat, ner and spam; the official openai client streams
    a chat completion from the chat task."""
    from openai import OpenAI

    tasks = {t["name"]: t for t in httpx.get(f"{server}/v1/tasks").json()["data"]}
    assert tasks["chat"]["type"] == "generate" and tasks["spam"]["type"] == "classify"
    assert tasks["ner"]["type"] == "extract" and "geo-loc" in tasks["ner"]["labels"]

    client = OpenAI(base_url=f"{server}/v1", api_key="unused")
    stream = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Who are you?"}],
                                            max_tokens=32, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    deltas, finish, usage = [], None, None
    for chunk in stream:
        if chunk.choices:
            deltas.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    text = "".join(deltas)
    assert "Aria" in text and len(deltas) > 3 and finish in ("stop", "length")
    assert usage.completion_tokens > 0
    plain = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Who are you?"}],
                                           max_tokens=32, temperature=0)
    assert plain.choices[0].message.content == text
    assert [m.id for m in client.models.list()][:1] == [httpx.get(f"{server}/v1/tasks").json()["data"][0]["name"]]

    spam = httpx.post(f"{server}/v1/tasks/spam", json={"text": "WINNER!! You have won a 1000 GBP prize. "
                                                               "Call 09061701461 now to claim"}).json()
    assert spam["label"] == "spam" and spam["scores"]["spam"] > 0.9
    ham = httpx.post(f"{server}/v1/tasks/spam", json={"text": "Ok, see you at lunch tomorrow then"}).json()
    assert ham["label"] == "ham"
    text = "I am flying to London with Justin Bieber tomorrow"
    ents = httpx.post(f"{server}/v1/tasks/ner", json={"text": text}).json()["entities"]
    assert all(text[e["start"]:e["end"]] == e["text"] for e in ents)
    at = text.index("London")
    assert {"text": "London", "label": "geo-loc", "start": at, "end": at + 6} in ents
    assert any(e["text"] == "Justin Bieber" and e["label"] == "person" for e in ents)
