"""TaskService's hand-off of tensor work to the engine thread, without a running model."""

from concurrent.futures import Future

import pytest

from app.services.errors import InvalidPromptSet, Overloaded
from app.services.tasks import TaskService
from prompt_store import PromptStore
from tests.helpers import input_prompt_set


class StalledEngine:
    """An engine whose loop never gets to the work handed to it (a step that takes forever)."""

    def __init__(self):
        self.calls = 0

    def call(self, fn):
        self.calls += 1
        return Future()


class InlineEngine:
    max_model_len = 256

    def call(self, fn):
        future = Future()
        try:
            future.set_result(fn())
        except Exception as exc:  # what Engine.call does on its thread
            future.set_exception(exc)
        return future

    def preload(self, ref):
        return self.call(lambda: None)

    def preload_content(self, sha256, prompt_set):
        return self.call(lambda: None)


def test_upload_answers_503_when_the_engine_does_not_get_to_it_and_stores_nothing(tiny, tmp_path):
    store = PromptStore(tmp_path / "store")
    service = TaskService(StalledEngine(), store, tiny.spec, tiny.tokenizer)
    service.engine_call_timeout = 0.05
    with pytest.raises(Overloaded) as err:
        service.upload("t", input_prompt_set(tiny.spec, 3).to_bytes(tiny.spec))
    assert err.value.headers == {"Retry-After": "1"} and service.engine.calls == 1
    assert store.tasks() == []


def test_validation_errors_raised_on_the_engine_thread_reach_the_caller(tiny, tmp_path):
    store = PromptStore(tmp_path / "store")
    service = TaskService(InlineEngine(), store, tiny.spec, tiny.tokenizer)
    with pytest.raises(InvalidPromptSet):
        service.upload("t", b"not a prompt set")
    assert store.tasks() == []
    info = service.upload("t", input_prompt_set(tiny.spec, 3).to_bytes(tiny.spec))
    assert info.version == 1 and store.tasks() == ["t"]
