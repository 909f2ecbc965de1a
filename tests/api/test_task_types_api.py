"""classify and extract answers, validated against their response schemas."""

import pytest

from app.api.schemas import ClassifyResponse, ExtractResponse
from tests.api.conftest import ADMIN
from tests.helpers import head_prompt_set


@pytest.fixture
def tasks(client, tiny):
    for name, ps in [("spam", head_prompt_set(tiny.spec, "classify", ["spam", "ham"], 2)),
                     ("ner", head_prompt_set(tiny.spec, "extract", ["person", "geo-loc"], 5, seed=1))]:
        r = client.put(f"/admin/prompt-sets/{name}", content=ps.to_bytes(tiny.spec), headers=ADMIN)
        assert r.status_code == 201
    return client


def test_classify_answers_label_and_probabilities(tasks):
    r = tasks.post("/v1/tasks/spam", json={"text": "WIN a free prize, call now!"})
    assert r.status_code == 200, r.text
    body = ClassifyResponse.model_validate(r.json())
    assert set(body.scores) == {"spam", "ham"} and body.label == max(body.scores, key=body.scores.get)
    assert sum(body.scores.values()) == pytest.approx(1.0, abs=1e-5)
    listed = tasks.get("/v1/tasks").json()
    assert {t["name"]: t["type"] for t in listed["data"]}["spam"] == "classify"


def test_extract_answers_entities_with_offsets_into_the_text(tasks):
    text = "Justin Bieber flew to Paris with   Selena Gomez yesterday !"
    r = tasks.post("/v1/tasks/ner", json={"text": text})
    assert r.status_code == 200, r.text
    body = ExtractResponse.model_validate(r.json())
    assert body.entities, "a random head tags some words"
    for e in body.entities:
        assert text[e.start:e.end] == e.text and e.label in ("person", "geo-loc")
        assert not e.text.startswith(" ") and not e.text.endswith(" ")
    assert tasks.post("/v1/tasks/ner", json={"text": "   "}).json()["entities"] == []


def test_wrong_input_field_for_the_task_type(tasks, tiny):
    assert tasks.post("/v1/tasks/spam", json={"prompt": "hello"}).status_code == 400
    assert tasks.post(f"/v1/tasks/{tiny.spec.name}", json={"text": "hello"}).status_code == 400


def test_head_shape_is_validated_on_upload(client, tiny):
    bad = head_prompt_set(tiny.spec, "classify", ["spam", "ham"], 3)
    r = client.put("/admin/prompt-sets/spam", content=bad.to_bytes(tiny.spec), headers=ADMIN)
    assert r.status_code == 422 and "head.weight" in r.json()["error"]["message"]
